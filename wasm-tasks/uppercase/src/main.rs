//! Echoes its input in upper case. Non-ASCII bytes pass through unchanged, so any input,
//! text or not, comes back the same length.

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
