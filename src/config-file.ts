/**
 * `tsvmm run --config vm.json`: the library's VmConfig as JSON, checked
 * field by field. Paths in the file are relative to the file's directory.
 * Library-only fields (a logger, kernel bytes) have no JSON form.
 */
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, resolve } from 'node:path';
import type * as Zod from 'zod';
import { TsvmmError } from './base/errors.js';
import { MAX_CPUS, MAX_HALT_POLL_NS, parseMemorySize } from './vmm/config.js';
import { MAX_PROFILE_RATE_HZ } from './tools/profiler.js';

/** A config file that cannot be read, is not JSON, or has a field that is wrong. */
export class ConfigFileError extends TsvmmError {
  constructor(
    message: string,
    /** The field at fault, as a path (`disks[0].path`), when one is. */
    readonly field?: string,
    options?: { cause?: unknown },
  ) {
    super('ERR_TSVMM_CONFIG_FILE', message, options);
  }
}

/**
 * zod, loaded on first use, synchronously (its CommonJS build): a run
 * without a config file does not pay its module loading, a quarter of the
 * CLI's start-up before this (about 55 ms of 224 on this project's PVM
 * host, `npm run bench -- startup`).
 */
let zodModule: typeof Zod | undefined;
function zod(): typeof Zod.z {
  zodModule ??= createRequire(import.meta.url)('zod') as typeof Zod;
  return zodModule.z;
}

function buildSchema(z: typeof Zod.z) {
  const transport = z.enum(['pci', 'mmio']);
  const memory = z.union([z.number(), z.string()]).superRefine((v, ctx) => {
    try {
      parseMemorySize(v);
    } catch (err) {
      ctx.addIssue({ code: 'custom', message: (err as Error).message });
    }
  });

  return z.strictObject({
    /** Optional here: `--kernel` may give it (the CLI checks that one of them does). */
    kernel: z.string().min(1).optional(),
    initrd: z.string().min(1).optional(),
    cmdline: z.string().optional(),
    memory: memory.optional(),
    cpus: z.int().min(1).max(MAX_CPUS).optional(),
    bootMode: z.enum(['auto', 'host', 'guest']).optional(),
    exitPath: z.enum(['thread', 'loop']).optional(),
    pit: z.enum(['emulated', 'kernel']).optional(),
    mergeable: z.boolean().optional(),
    haltPollNs: z.int().min(0).max(MAX_HALT_POLL_NS).optional(),
    emulationFallback: z.enum(['auto', 'on', 'off']).optional(),
    disks: z
      .array(
        z.strictObject({ path: z.string().min(1), readonly: z.boolean().optional(), serial: z.string().max(20).optional(), transport: transport.optional() }),
      )
      .optional(),
    nets: z
      .array(
        z.strictObject({
          tap: z.string().min(1).max(15),
          mac: z
            .string()
            .regex(/^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/i, 'a MAC address such as 52:54:00:12:34:56')
            .optional(),
          transport: transport.optional(),
        }),
      )
      .optional(),
    transport: transport.optional(),
    acpi: z.boolean().optional(),
    initrdInflate: z.boolean().optional(),
    kernelCache: z.union([z.string().min(1), z.literal(false)]).optional(),
    console: z.enum(['serial', 'virtio', 'off']).optional(),
    serial: z.union([z.enum(['console', 'off']), z.strictObject({ file: z.string().min(1) }), z.strictObject({ socket: z.string().min(1) })]).optional(),
    name: z.string().min(1).optional(),
    kvmDevice: z.string().min(1).optional(),
    profile: z
      .strictObject({
        path: z.string().min(1),
        systemMap: z.string().min(1).optional(),
        rateHz: z.int().min(1).max(MAX_PROFILE_RATE_HZ).optional(),
        format: z.enum(['text', 'json']).optional(),
      })
      .optional(),
    coalescedIo: z.boolean().optional(),
    legacyIrqfd: z.boolean().optional(),
    sandbox: z
      .union([z.boolean(), z.strictObject({ allow: z.array(z.strictObject({ path: z.string().min(1), access: z.enum(['read', 'write']) })).optional() })])
      .optional(),
  });
}

let schema: ReturnType<typeof buildSchema> | undefined;

/** The JSON form of {@link VmConfig}, a zod schema built on first use: unknown fields are refused (a typo must not pass silently). */
export function vmConfigSchema(): ReturnType<typeof buildSchema> {
  schema ??= buildSchema(zod());
  return schema;
}

/** A VmConfig read from JSON: every field of VmConfig that JSON can hold. */
export type FileVmConfig = Zod.infer<ReturnType<typeof buildSchema>>;

/** `disks[0].path` from zod's path. */
function fieldName(path: readonly PropertyKey[]): string {
  return path.reduce<string>((s, k) => (typeof k === 'number' ? `${s}[${k}]` : s ? `${s}.${String(k)}` : String(k)), '');
}

/**
 * Checks a parsed JSON value as a VmConfig; `source` names it in errors.
 * Relative paths are taken from `baseDir`.
 */
export function parseVmConfig(value: unknown, source: string, baseDir?: string): FileVmConfig {
  const r = vmConfigSchema().safeParse(value);
  if (!r.success) {
    const issue = r.error.issues[0]!;
    const field = fieldName(issue.path);
    const what =
      issue.code === 'unrecognized_keys'
        ? `unknown field${issue.keys.length > 1 ? 's' : ''} ${issue.keys.map((k) => `"${field ? `${field}.` : ''}${k}"`).join(', ')}`
        : `"${field}": ${issue.message}`;
    throw new ConfigFileError(`${source}: ${field === '' && issue.code !== 'unrecognized_keys' ? issue.message : what}`, field || undefined);
  }
  const c = r.data;
  if (baseDir === undefined) return c;
  const at = (p: string) => resolve(baseDir, p);
  return {
    ...c,
    ...(c.kernel !== undefined ? { kernel: at(c.kernel) } : {}),
    ...(c.initrd !== undefined ? { initrd: at(c.initrd) } : {}),
    ...(typeof c.kernelCache === 'string' ? { kernelCache: at(c.kernelCache) } : {}),
    ...(typeof c.serial === 'object' ? { serial: 'file' in c.serial ? { file: at(c.serial.file) } : { socket: at(c.serial.socket) } } : {}),
    ...(c.disks ? { disks: c.disks.map((d) => ({ ...d, path: at(d.path) })) } : {}),
    ...(c.profile ? { profile: { ...c.profile, path: at(c.profile.path), ...(c.profile.systemMap ? { systemMap: at(c.profile.systemMap) } : {}) } } : {}),
    ...(typeof c.sandbox === 'object' && c.sandbox.allow ? { sandbox: { allow: c.sandbox.allow.map((a) => ({ ...a, path: at(a.path) })) } } : {}),
  };
}

/** Reads and checks a JSON config file. */
export function readVmConfigFile(path: string): FileVmConfig {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    throw new ConfigFileError(
      `cannot read the config file ${path} (${(err as NodeJS.ErrnoException).code}): give --config the path of a JSON file`,
      undefined,
      { cause: err },
    );
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new ConfigFileError(`${path} is not JSON (${(err as Error).message}): write the VM's configuration as one JSON object`, undefined, { cause: err });
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw new ConfigFileError(
      `${path} must hold one JSON object (the VM's configuration), not ${Array.isArray(value) ? 'an array' : typeof value === 'object' ? 'null' : `a ${typeof value}`}`,
    );
  }
  return parseVmConfig(value, path, dirname(resolve(path)));
}
