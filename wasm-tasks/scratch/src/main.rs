//! Sorts the lines of its input through files in its scratch directory: it spills runs of
//! lines to files, as an external sort does with more data than memory, then merges them.
//! Shows the `scratch` grant: a private directory at `/scratch`, size-capped, gone after the
//! run. It prints the sorted lines; run it without the grant and it fails, saying so.
//!
//! ```sh
//! apiary task submit wasm-tasks/target/wasm32-wasip1/release/scratch.wasm \
//!     --scratch 1MiB --input "$(printf 'pear\napple\nfig\n')"
//! ```

use std::collections::VecDeque;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use apiary_guest::{Error, grants};

/// Lines per spilled run.
const RUN_LINES: usize = 2;

fn main() {
    apiary_guest::run(|input| {
        let dir = grants::scratch_dir()
            .ok_or_else(|| Error::new("no scratch directory: submit with the scratch grant"))?;
        let text = std::str::from_utf8(input).map_err(|_| Error::new("the input must be UTF-8"))?;
        let runs = spill(dir, text)?;
        merge(&runs)
    });
}

/// Writes the lines in sorted runs of [`RUN_LINES`], one file each.
fn spill(dir: &Path, text: &str) -> Result<Vec<PathBuf>, Error> {
    let lines: Vec<&str> = text.lines().collect();
    let mut runs = Vec::new();
    for (index, chunk) in lines.chunks(RUN_LINES).enumerate() {
        let mut chunk = chunk.to_vec();
        chunk.sort_unstable();
        let path = dir.join(format!("run-{index}"));
        let mut file = fs::File::create(&path)?;
        for line in chunk {
            writeln!(file, "{line}")?;
        }
        runs.push(path);
    }
    Ok(runs)
}

/// Merges the sorted runs into one sorted output, reading them back from their files.
fn merge(runs: &[PathBuf]) -> Result<Vec<u8>, Error> {
    let mut readers = Vec::new();
    for path in runs {
        let lines = BufReader::new(fs::File::open(path)?)
            .lines()
            .collect::<Result<VecDeque<String>, _>>()?;
        readers.push(lines);
    }
    let mut output = Vec::new();
    loop {
        let smallest = readers
            .iter()
            .enumerate()
            .filter_map(|(index, lines)| lines.front().map(|line| (index, line)))
            .min_by(|(_, a), (_, b)| a.cmp(b))
            .map(|(index, _)| index);
        let Some(line) = smallest.and_then(|index| readers[index].pop_front()) else {
            return Ok(output);
        };
        output.extend_from_slice(line.as_bytes());
        output.push(b'\n');
    }
}
