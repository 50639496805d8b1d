import { pino, type Logger } from 'pino';

export type { Logger };

/** Log levels accepted by `--log-level` and {@link createLogger}. */
export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

/**
 * The root logger writes JSON lines to stderr, never to stdout, so logs are
 * never mixed into the guest console stream.
 */
export function createLogger(level: LogLevel = 'warn'): Logger {
  return pino({ name: 'tsvmm', level }, pino.destination({ fd: 2, sync: true }));
}

/** A logger that drops everything: the default for device models under test. */
export const silentLogger: Logger = pino({ level: 'silent' });

/**
 * Runs one step of a teardown: an error it throws is logged under `step`
 * with `message` and returned, never thrown, so the steps after it still
 * run.
 */
export function runLogged(log: Logger, message: string, step: string, f: () => unknown): Error | undefined {
  try {
    f();
    return undefined;
  } catch (err) {
    const e = err instanceof Error ? err : new Error(String(err));
    log.error({ err: e, step }, message);
    return e;
  }
}

/** How many events of one kind a {@link GuestEventLog} logs before it only counts them. */
export const GUEST_EVENT_LOG_LIMIT = 10;

type EventLevel = 'error' | 'warn' | 'info';

/**
 * A log for what a guest makes the VMM do (refused register writes,
 * broken rings, activations): a guest that repeats one thing 10,000 times
 * must not write 10,000 lines to a synchronous destination. The first
 * {@link GUEST_EVENT_LOG_LIMIT} events of each kind are logged; one more
 * line says the rest are counted, in `suppressed` (which device stats
 * expose). `kind` is a fixed name per call site, never built from guest
 * data, so the table of kinds stays small.
 */
export class GuestEventLog {
  /** Events counted but not logged. */
  suppressed = 0;
  private readonly seen = new Map<string, number>();

  /** `counts`: the owner's stats, whose `unloggedEvents` follows `suppressed`. */
  constructor(
    private readonly log: Logger,
    private readonly counts?: { unloggedEvents: number },
    private readonly limit = GUEST_EVENT_LOG_LIMIT,
  ) {}

  error(kind: string, obj: object, msg: string): void {
    this.event('error', kind, obj, msg);
  }

  warn(kind: string, obj: object, msg: string): void {
    this.event('warn', kind, obj, msg);
  }

  info(kind: string, obj: object, msg: string): void {
    this.event('info', kind, obj, msg);
  }

  private event(level: EventLevel, kind: string, obj: object, msg: string): void {
    const n = (this.seen.get(kind) ?? 0) + 1;
    this.seen.set(kind, n);
    if (n <= this.limit) {
      this.log[level](obj, msg);
      if (n === this.limit) this.log[level]({ kind }, `${kind}: logged ${n} times; further ones are only counted`);
      return;
    }
    this.suppressed++;
    if (this.counts) this.counts.unloggedEvents = this.suppressed;
  }
}
