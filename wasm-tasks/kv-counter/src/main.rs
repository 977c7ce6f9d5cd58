//! Adds one to a counter in its namespace's app store and prints the new count: a
//! read-modify-write that stays right when many tasks run it at once, because each write is
//! a compare-and-swap on the revision it read (`kv::update`), retried when another task
//! wrote first.
//!
//! The counter's key is the input (`counter` when the input is empty). Needs the `kv` grant
//! and a namespace:
//!
//! ```sh
//! apiary task submit wasm-tasks/target/wasm32-wasip1/release/kv-counter.wasm \
//!     --namespace demo --kv --input visits
//! apiary kv get demo visits
//! ```

use apiary_guest::{Error, ErrorKind, kv, log};

fn main() {
    apiary_guest::run(|input| {
        let key = match std::str::from_utf8(input).map(str::trim) {
            Ok("") => "counter",
            Ok(key) => key,
            Err(_) => return Err(Error::new("the key must be UTF-8")),
        };
        let count = increment(key)?;
        Ok(format!("{count}\n"))
    });
}

/// Adds one to the count under `key`, retrying while other writers get there first.
fn increment(key: &str) -> Result<u64, Error> {
    let mut conflicts = 0u32;
    loop {
        let written = match kv::get(key)? {
            None => kv::create(key, b"1").map(|_| 1),
            Some(entry) => {
                let count = std::str::from_utf8(&entry.value)
                    .ok()
                    .and_then(|text| text.trim().parse::<u64>().ok())
                    .ok_or_else(|| Error::new(format!("{key} does not hold a count")))?;
                kv::update(key, (count + 1).to_string().as_bytes(), entry.revision)
                    .map(|_| count + 1)
            }
        };
        match written {
            Ok(count) => {
                if conflicts > 0 {
                    log::debug(&format!("{conflicts} other writers came first"));
                }
                return Ok(count);
            }
            Err(err) if err.kind() == ErrorKind::Conflict => conflicts += 1,
            Err(err) => return Err(err),
        }
    }
}
