//! Prints the SHA-256 of its stdin as lowercase hex and a newline: a CPU-bound task whose
//! answer anyone can check (`sha256sum` gives the same).
//!
//! ```sh
//! scripts/test          # builds it, with the other guests, into wasm-tasks/target
//! apiary task submit wasm-tasks/target/wasm32-wasip1/release/sha256.wasm --input big.bin
//! ```

use std::io::{self, Read, Write};

use sha2::{Digest, Sha256};

fn main() {
    let mut hasher = Sha256::new();
    let mut buffer = [0u8; 64 * 1024];
    let mut stdin = io::stdin();
    loop {
        match stdin.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => hasher.update(&buffer[..read]),
            Err(err) => {
                eprintln!("sha256: cannot read stdin: {err}");
                std::process::exit(2);
            }
        }
    }
    let digest = hasher.finalize();
    let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    if writeln!(io::stdout(), "{hex}").is_err() {
        std::process::exit(2);
    }
}
