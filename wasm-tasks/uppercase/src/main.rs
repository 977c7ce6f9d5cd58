//! Echoes its input in upper case. Non-ASCII bytes pass through unchanged, so any input,
//! text or not, comes back the same length. The smallest task there is: a plain WASI command,
//! input on stdin, answer on stdout.
//!
//! ```sh
//! echo hello | apiary task submit wasm-tasks/target/wasm32-wasip1/release/uppercase.wasm --input -
//! ```

use std::io::{self, Read, Write};

fn main() {
    let mut input = Vec::new();
    if let Err(err) = io::stdin().read_to_end(&mut input) {
        eprintln!("uppercase: cannot read stdin: {err}");
        std::process::exit(2);
    }
    input.make_ascii_uppercase();
    if io::stdout().write_all(&input).is_err() {
        std::process::exit(2);
    }
}
