/**
 * The console's escape key in typed input, as in QEMU and screen: Ctrl-A x
 * ends the session (`tsvmm run`: stops the VM; `tsvmm console`: detaches),
 * Ctrl-A Ctrl-A types one Ctrl-A, Ctrl-A h asks for the keys; any other
 * key after Ctrl-A is dropped.
 */
export const ESCAPE = 0x01;

export interface EscapedInput {
  /** The bytes to pass to the guest (before the quit, when there is one). */
  bytes: Buffer;
  /** Ctrl-A x was typed: what follows it in the chunk is dropped. */
  quit: boolean;
  /** Ctrl-A h was typed. */
  help: boolean;
}

/** Reads typed input for escapes; an escape split across chunks is kept. */
export class EscapeKeys {
  private escaped = false;

  filter(chunk: Uint8Array): EscapedInput {
    const out: number[] = [];
    let help = false;
    for (const b of chunk) {
      if (this.escaped) {
        this.escaped = false;
        if (b === 0x78 /* x */) return { bytes: Buffer.from(out), quit: true, help };
        if (b === ESCAPE) out.push(ESCAPE);
        else if (b === 0x68 /* h */) help = true;
        continue;
      }
      if (b === ESCAPE) this.escaped = true;
      else out.push(b);
    }
    return { bytes: Buffer.from(out), quit: false, help };
  }
}
