//! Reads `n` from stdin (25 when empty) and prints the n-th Fibonacci number, computed by
//! the naive doubly recursive definition on purpose: the work grows by about 1.6 times with
//! each step of `n`, so one module gives a benchmark any amount of CPU to burn, the same on
//! every machine (the fuel it consumes is exact and reported in its result).
//!
//! ```sh
//! echo 30 | apiary task submit wasm-tasks/target/wasm32-wasip1/release/fib.wasm --input -
//! ```

use std::io::{self, Read, Write};

fn fib(n: u32) -> u64 {
    if n < 2 {
        u64::from(n)
    } else {
        fib(n - 1) + fib(n - 2)
    }
}

fn main() {
    let mut input = String::new();
    if let Err(err) = io::stdin().read_to_string(&mut input) {
        eprintln!("fib: cannot read stdin: {err}");
        std::process::exit(2);
    }
    let input = input.trim();
    let n: u32 = if input.is_empty() {
        25
    } else {
        match input.parse() {
            // fib(93) is the last that fits in a u64, and long before that the naive
            // recursion takes longer than any timeout.
            Ok(n) if n <= 93 => n,
            _ => {
                eprintln!("fib: {input:?} is not a number from 0 to 93");
                std::process::exit(1);
            }
        }
    };
    if writeln!(io::stdout(), "{}", fib(n)).is_err() {
        std::process::exit(2);
    }
}
