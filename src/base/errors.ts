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
