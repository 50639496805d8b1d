/** The plain-text results table printed on stdout. */
import type { Row } from './benchmark.js';
import { max, min } from './stats.js';

/** A number with about four significant digits, without exponent noise. */
export function formatNumber(x: number): string {
  if (!Number.isFinite(x)) return String(x);
  const abs = Math.abs(x);
  if (abs >= 1000) return x.toFixed(0);
  if (abs >= 100) return x.toFixed(1);
  if (abs >= 10) return x.toFixed(2);
  return x.toFixed(3);
}

function spread(row: Row): string {
  if (!row.samples || row.samples.length < 2) return '';
  return `${formatNumber(min(row.samples))} .. ${formatNumber(max(row.samples))}`;
}

/** Renders one benchmark's rows as an aligned table with a title line. */
export function renderTable(title: string, rows: readonly Row[]): string {
  const header = ['', 'median', 'unit', 'min .. max', 'n', 'note'];
  const body = rows.map((r) => [r.label, formatNumber(r.value), r.unit, spread(r), r.samples ? String(r.samples.length) : '', r.note ?? '']);
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((line) => line[i]!.length)));
  const numeric = new Set([1, 3, 4]);
  const fmt = (cells: string[]) =>
    cells
      .map((c, i) => (numeric.has(i) ? c.padStart(widths[i]!) : c.padEnd(widths[i]!)))
      .join('  ')
      .trimEnd();
  const rule = widths.map((w) => '-'.repeat(w)).join('  ');
  return [title, fmt(header), rule, ...body.map(fmt)].join('\n');
}
