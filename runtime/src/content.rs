//! Synthetic guest-memory content for benchmarks, demos and preloads.
//!
//! Migration speed depends on what memory holds: zero pages cost a marker, text compresses,
//! random data does not. `Mixed` approximates a used guest: about 40% zero pages, 30% text,
//! 20% random (compressed or encrypted data), 10% sparse (page tables, sparse arrays).

use std::io::Write;
use std::path::Path;

use crate::layout::PAGE_SIZE;

/// What to fill pages with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// Incompressible.
    Random,
    /// All zero.
    Zero,
    /// The mix described in the module docs.
    Mixed,
}

impl Content {
    /// Parses `random`, `zero` or `mixed`.
    pub fn parse(name: &str) -> Option<Content> {
        match name {
            "random" => Some(Content::Random),
            "zero" => Some(Content::Zero),
            "mixed" => Some(Content::Mixed),
            _ => None,
        }
    }
}

/// xorshift64: fast, deterministic, good enough to defeat compression.
#[derive(Debug, Clone)]
pub struct XorShift(pub u64);

impl XorShift {
    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "guest",
    "memory",
    "page",
    "kernel",
    "migration",
    "socket",
    "buffer",
    "process",
    "thread",
    "network",
    "device",
    "interrupt",
    "virtual",
    "machine",
    "state",
    "copy",
    "dirty",
    "round",
    "latency",
    "throughput",
    "compress",
    "host",
    "destination",
    "source",
    "error",
    "value",
    "return",
    "function",
];

fn random_page(page: &mut [u8], rng: &mut XorShift) {
    for chunk in page.chunks_exact_mut(8) {
        chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
}

/// Words from a small vocabulary: compresses about 2.5x with lz4, like text and much
/// page-cache content.
fn text_page(page: &mut [u8], rng: &mut XorShift) {
    let mut at = 0;
    while at < page.len() {
        let word = WORDS[(rng.next_u64() % WORDS.len() as u64) as usize].as_bytes();
        let n = word.len().min(page.len() - at);
        page[at..at + n].copy_from_slice(&word[..n]);
        at += n;
        if at < page.len() {
            page[at] = if rng.next_u64().is_multiple_of(12) {
                b'\n'
            } else {
                b' '
            };
            at += 1;
        }
    }
}

/// A few scattered non-zero words in an otherwise zero page.
fn sparse_page(page: &mut [u8], rng: &mut XorShift) {
    page.fill(0);
    for _ in 0..16 {
        let at = (rng.next_u64() % (page.len() as u64 / 8)) as usize * 8;
        page[at..at + 8].copy_from_slice(&rng.next_u64().to_le_bytes());
    }
}

/// Fills `memory` (a whole number of pages) with `content`, deterministically from `seed`.
pub fn fill(memory: &mut [u8], content: Content, seed: u64) {
    let mut rng = XorShift(seed | 1);
    for page in memory.chunks_exact_mut(PAGE_SIZE as usize) {
        match content {
            Content::Zero => page.fill(0),
            Content::Random => random_page(page, &mut rng),
            Content::Mixed => match rng.next_u64() % 10 {
                0..=3 => page.fill(0),
                4..=6 => text_page(page, &mut rng),
                7..=8 => random_page(page, &mut rng),
                _ => sparse_page(page, &mut rng),
            },
        }
    }
}

/// Writes `bytes` of `content` to `path` (for `--preload`), in 1 MiB steps.
pub fn write_file(path: &Path, content: Content, bytes: u64, seed: u64) -> std::io::Result<()> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut chunk = vec![0u8; 1 << 20];
    let mut rng = XorShift(seed | 1);
    let mut left = bytes / PAGE_SIZE * PAGE_SIZE;
    while left > 0 {
        let n = (chunk.len() as u64).min(left) as usize;
        fill(&mut chunk[..n], content, rng.next_u64());
        file.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    file.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixed_content_has_the_intended_shares() {
        let mut memory = vec![0u8; 4096 * 2000];
        fill(&mut memory, Content::Mixed, 7);
        let pages: Vec<&[u8]> = memory.chunks(4096).collect();
        let zero = pages.iter().filter(|p| p.iter().all(|&b| b == 0)).count() as f64;
        let text = pages
            .iter()
            .filter(|p| {
                p[..64]
                    .iter()
                    .all(|b| b.is_ascii_alphabetic() || b" \n".contains(b))
            })
            .count() as f64;
        let n = pages.len() as f64;
        assert!(
            (0.35..0.45).contains(&(zero / n)),
            "zero share {}",
            zero / n
        );
        assert!(
            (0.25..0.35).contains(&(text / n)),
            "text share {}",
            text / n
        );
        let mut again = vec![0u8; memory.len()];
        fill(&mut again, Content::Mixed, 7);
        assert_eq!(again, memory, "deterministic");
    }
}
