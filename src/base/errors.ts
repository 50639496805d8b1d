/**
 * The base of tsvmm's errors: a stable `code` in Node's convention
 * (`ERR_TSVMM_...`) that a program can switch on, a message that says what
 * is wrong in library terms, and the `cause` when another error led to it.
 */
export class TsvmmError extends Error {
  constructor(
    readonly code: `ERR_TSVMM_${string}`,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** `ERR_TSVMM_` + `prefix` + `kind` in capitals: 'BOOT_', 'not-a-kernel' → 'ERR_TSVMM_BOOT_NOT_A_KERNEL'. */
export function errorCode(prefix: string, kind: string): `ERR_TSVMM_${string}` {
  return `ERR_TSVMM_${prefix}${kind.replace(/-/g, '_').toUpperCase()}`;
}

/**
 * The base of errors with sub-cases: `kind` names the case in the
 * module's own words (kept from before every error had a `code`), and
 * `code` is `ERR_TSVMM_<PREFIX><KIND>`.
 */
export class TsvmmKindError<K extends string> extends TsvmmError {
  constructor(
    prefix: string,
    readonly kind: K,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(errorCode(prefix, kind), message, options);
  }
}
