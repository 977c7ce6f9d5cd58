//! Counts the lines, words and bytes of its input, like `wc`, and prints them as
//! `lines words bytes`. Words are runs of non-whitespace, as `wc` counts them. A plain WASI
//! command with no crate of apiary's: any `fn main` reading stdin is a task.
//!
//! ```sh
//! apiary task submit wasm-tasks/target/wasm32-wasip1/release/wordcount.wasm --input notes.txt
//! apiary task map wasm-tasks/target/wasm32-wasip1/release/wordcount.wasm --lines notes.txt
//! ```

use std::io::{self, Read, Write};

fn main() {
    let mut input = Vec::new();
    if let Err(err) = io::stdin().read_to_end(&mut input) {
        eprintln!("wordcount: cannot read stdin: {err}");
        std::process::exit(2);
    }
    let lines = input.iter().filter(|&&b| b == b'\n').count();
    let words = input
        .split(|b| b.is_ascii_whitespace())
        .filter(|word| !word.is_empty())
        .count();
    let mut stdout = io::stdout().lock();
    if writeln!(stdout, "{lines} {words} {}", input.len()).is_err() {
        std::process::exit(2);
    }
}
