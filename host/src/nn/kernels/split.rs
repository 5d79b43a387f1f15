//! How a tiled product's work is shared out across the compute pool: each image's columns in
//! ranges of whole strips (a strip is one tile's width), its row panels in groups, one unit of
//! parallel work per (image, column range, row group).
//!
//! A unit reads its columns of B once per slice of `k` (packing them, where the kernel packs)
//! and then every panel of its group against them, so splitting by columns costs a second
//! pass over A's panels and splitting by rows a second read (or copy) of B's columns. The
//! split is the one whose busiest thread finishes first, by a cost model of those reads
//! ([`Split::choose`]). Before, a fixed four units per thread left 2 threads 9 units of
//! MiniLM's Q/K/V product at 640 tokens (one thread then runs a ninth of it alone), and split
//! rows where only columns needed splitting: MiniLM's 8 x 128 pass ran 76-82 ms so, 73 ms
//! split by the model (`scripts/bench.sh embed`, alternating runs).

use std::cell::RefCell;
use std::ops::Range;

use super::sgemm::NC;

/// The cost of reading a unit's columns of B, in rows of product (per column): a copy of B's
/// strided rows (a packing kernel) costs about what 16 rows of multiply-adds do, a read in
/// place from memory, half that.
const B_ROWS: [usize; 2] = [8, 16];
/// The cost of streaming a unit's panels of A from L2 or L3, in columns of product (per row).
const A_COLS: usize = 4;

/// One product's split. Every unit covers whole strips and whole panels; the ranges of one
/// image tile its columns and rows exactly once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Split {
    batch: usize,
    n: usize,
    width: usize,
    strips: usize,
    chunks: usize,
    tiles: usize,
    groups: usize,
}

/// Splits chosen so far on this thread, by what [`Split::choose`] reads: the search runs once
/// per product shape, not on every call.
type Key = [usize; 7];

thread_local! {
    static CHOSEN: RefCell<Vec<(Key, Split)>> = const { RefCell::new(Vec::new()) };
}

/// The most threads [`Split::choose`] searches splits for: the search weighs up to `16·T²`
/// splits of up to `8·T` units (a few hundred microseconds per shape at 16); above it, a
/// fixed four units per thread.
const SEARCHED_THREADS: usize = 16;

/// At most this many shapes are remembered per thread (a model has a few dozen).
const REMEMBERED: usize = 256;

/// Part `i` of `0..total` cut into `parts` ranges whose lengths differ by at most one.
fn even(total: usize, parts: usize, i: usize) -> Range<usize> {
    total * i / parts..total * (i + 1) / parts
}

impl Split {
    /// The split of `batch` products of `m` rows (in panels of `mr`) by `n` columns (in strips
    /// of `width`) over `threads` threads; `packs_b` where the kernel copies B's columns
    /// before it reads them. With one thread (or work for many units already) each image's
    /// columns split only as far as the GEMM's widest unit ([`NC`] columns, which stay in L2
    /// while the unit's panels run past them) requires, its rows not at all.
    pub(crate) fn choose(
        batch: usize,
        [m, n]: [usize; 2],
        [mr, width]: [usize; 2],
        threads: usize,
        packs_b: bool,
    ) -> Self {
        let strips = n.div_ceil(width.max(1));
        let tiles = m.div_ceil(mr.max(1));
        let widest = (NC / width.max(1)).max(1);
        let base = Split { batch, n, width, strips, chunks: strips.div_ceil(widest).max(1), tiles, groups: 1 };
        if threads <= 1 || strips == 0 || tiles == 0 || batch.saturating_mul(base.chunks) >= 4 * threads {
            return base;
        }
        if threads > SEARCHED_THREADS {
            // About four units per thread: rows in as many groups as the columns leave wanting.
            let groups = (4 * threads).div_ceil(batch * base.chunks).min(tiles);
            return Split { groups, ..base };
        }
        let key = [batch, m, n, mr, width, threads, usize::from(packs_b)];
        if let Some(found) = CHOSEN.with(|c| c.borrow().iter().find(|(k, _)| *k == key).map(|(_, s)| *s)) {
            return found;
        }
        let chosen = Self::search(base, mr.max(1), m, threads, B_ROWS[usize::from(packs_b)]);
        CHOSEN.with(|c| {
            let mut c = c.borrow_mut();
            if c.len() >= REMEMBERED {
                c.clear();
            }
            c.push((key, chosen));
        });
        chosen
    }

    /// Every split of up to `4·threads` ranges of columns (at least `base`'s) and of rows, and
    /// up to `8·threads` units, by the time its busiest thread takes (units handed out largest
    /// first to the least loaded thread); of splits within 1% of the best, the one of fewest
    /// units.
    fn search(base: Split, mr: usize, m: usize, threads: usize, b_rows: usize) -> Split {
        let most = (4 * threads).max(base.chunks);
        let mut weighed: Vec<(u64, usize, Split)> = Vec::new();
        let mut costs = Vec::new();
        let mut loads = std::collections::BinaryHeap::with_capacity(threads);
        for chunks in base.chunks..=most.min(base.strips) {
            for groups in 1..=(4 * threads).min(base.tiles) {
                let split = Split { chunks, groups, ..base };
                // Past 8 units per thread, each only adds its reads.
                if split.units() > (8 * threads).max(base.batch * base.chunks) {
                    break;
                }
                costs.clear();
                for c in 0..chunks {
                    let cols = split.cols(c);
                    let cols = (cols.end - cols.start) as u64;
                    for g in 0..groups {
                        let panels = split.panels(g);
                        let rows = ((panels.end * mr).min(m) - panels.start * mr) as u64;
                        let cost = rows * cols + b_rows as u64 * cols + A_COLS as u64 * rows;
                        costs.extend(std::iter::repeat_n(cost, base.batch));
                    }
                }
                costs.sort_unstable_by(|a, b| b.cmp(a));
                loads.clear();
                loads.extend(std::iter::repeat_n(std::cmp::Reverse(0u64), threads));
                for &cost in &costs {
                    if let Some(mut least) = loads.peek_mut() {
                        least.0 += cost;
                    }
                }
                let span = loads.iter().map(|l| l.0).max().unwrap_or(0);
                weighed.push((span, split.units(), split));
            }
        }
        // Of the splits within 1% of the fastest, the fewest units (then the faster).
        let fastest = weighed.iter().map(|w| w.0).min().unwrap_or(0);
        weighed
            .into_iter()
            .filter(|w| w.0.saturating_mul(100) <= fastest.saturating_mul(101))
            .min_by_key(|w| (w.1, w.0))
            .map_or(base, |w| w.2)
    }

    /// Units of work: one per image, range of columns and group of rows.
    pub(crate) fn units(&self) -> usize {
        self.batch * self.chunks * self.groups
    }

    /// Unit `u`'s image, columns and row panels. Neighbouring units share an image and a
    /// range of columns (one thread's run of units then reads the same columns of B).
    pub(crate) fn unit(&self, u: usize) -> (usize, Range<usize>, Range<usize>) {
        let (img, chunk, g) = (u / (self.groups * self.chunks), (u / self.groups) % self.chunks, u % self.groups);
        (img, self.cols(chunk), self.panels(g))
    }

    /// The columns of range `chunk`: whole strips, the last one cut at `n`.
    fn cols(&self, chunk: usize) -> Range<usize> {
        let s = even(self.strips, self.chunks, chunk);
        (s.start * self.width).min(self.n)..(s.end * self.width).min(self.n)
    }

    /// The row panels of group `g`.
    fn panels(&self, g: usize) -> Range<usize> {
        even(self.tiles, self.groups, g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every unit is non-empty, and one image's units cover each (column, panel) once.
    #[test]
    fn units_tile_each_image_exactly_once() {
        for threads in [1, 2, 3, 4, 8, 64] {
            for (batch, m, n) in [
                (1, 1152, 640),
                (1, 384, 1024),
                (1, 672, 196),
                (1, 320, 49),
                (3, 24, 3136),
                (1, 5, 7),
                (2, 1, 1),
                (1, 1536, 8),
            ] {
                for packs in [false, true] {
                    let s = Split::choose(batch, [m, n], [12, 32], threads, packs);
                    let tiles = m.div_ceil(12);
                    let mut seen = vec![0u32; batch * tiles * n];
                    for u in 0..s.units() {
                        let (img, cols, panels) = s.unit(u);
                        assert!(img < batch && !cols.is_empty() && !panels.is_empty(), "{s:?} unit {u}");
                        assert!(cols.start.is_multiple_of(32) && cols.end <= n && panels.end <= tiles, "{s:?}");
                        for t in panels {
                            for j in cols.clone() {
                                seen[(img * tiles + t) * n + j] += 1;
                            }
                        }
                    }
                    assert!(seen.iter().all(|&x| x == 1), "{s:?}: some element computed {:?} times", seen.iter().max());
                }
            }
        }
    }

    /// The splits the cost model picks for the shapes it was measured on: units a multiple of
    /// the threads where whole strips allow, fewest where B is copied.
    #[test]
    fn balanced_splits_for_two_threads() {
        // MiniLM's Q/K/V at 640 tokens: 20 strips, 96 panels; 9 units was the slow split.
        let qkv = Split::choose(1, [1152, 640], [12, 32], 2, false);
        assert!(qkv.units().is_multiple_of(2), "{qkv:?}");
        // Its second dense layer at 1,024 tokens, B copied: 4 ranges of 8 strips, rows whole.
        let ffn2 = Split::choose(1, [384, 1024], [12, 32], 2, true);
        assert_eq!((ffn2.chunks, ffn2.groups), (4, 1), "{ffn2:?}");
        // One strip of columns (8 tokens): the rows split instead.
        let short = Split::choose(1, [1152, 8], [12, 32], 2, false);
        assert_eq!(short.chunks, 1);
        assert!(short.groups >= 2 && short.groups.is_multiple_of(2), "{short:?}");
        // One thread: no more ranges than the widest strip count requires.
        let alone = Split::choose(1, [1152, 640], [12, 32], 1, false);
        assert_eq!((alone.chunks, alone.groups), (3, 1));
    }
}
