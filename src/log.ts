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
