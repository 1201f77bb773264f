//! Which streams one read of new entries asks, how many entries of each, and whether it
//! may block: every stream with entries is read within one rotation, and the reader
//! blocks only once every stream it reads was found empty.

/// One read of new entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReadPlan {
    /// The streams to read, by index.
    pub(crate) streams: Vec<usize>,
    /// The most entries asked of each (`COUNT`).
    pub(crate) count: usize,
    /// Whether the read may wait for new entries.
    pub(crate) block: bool,
}

impl ReadPlan {
    /// One entry of each of some paused streams: does their handler work again? It waits
    /// for a new entry (`block`) only when no other stream is read meanwhile, which it
    /// would hold up.
    pub(crate) fn probe(streams: Vec<usize>, block: bool) -> Self {
        ReadPlan {
            streams,
            count: 1,
            block,
        }
    }
}

/// The rotation over a consumer's streams, and what the last read of each found.
#[derive(Debug)]
pub(crate) struct ReadWindow {
    /// The stream the next partial read starts at.
    rotation: usize,
    /// Whether the last read of each stream returned fewer entries than asked for.
    found_empty: Vec<bool>,
}

impl ReadWindow {
    pub(crate) fn new(streams: usize) -> Self {
        ReadWindow {
            rotation: 0,
            found_empty: vec![false; streams],
        }
    }

    /// Plans the next read over the `active` streams (those whose reading is not paused;
    /// at least one), with `free` handler slots and `places` free among the held entries.
    ///
    /// With a slot for every active stream, it reads them all, sharing the slots out.
    /// With fewer, it reads as many streams as there are slots, one entry each, in
    /// rotation, and moves the rotation past them: every stream is read within one
    /// rotation whatever the free counts. Once every stream outside that window was found
    /// empty, one read asks all of them instead (entries beyond the free slots then wait
    /// for a slot, holding a place), so that an idle stream never holds back a busy one.
    /// A read blocks only when every active stream was found empty.
    pub(crate) fn plan(
        &mut self,
        active: &[bool],
        free: usize,
        places: usize,
        max_count: usize,
    ) -> ReadPlan {
        let total = active.len();
        let in_rotation: Vec<usize> = (0..total)
            .map(|i| (self.rotation + i) % total)
            .filter(|&i| active[i])
            .collect();
        let n = in_rotation.len().max(1);
        let free = free.min(places).max(1);
        // Blocking is for streams known to be empty: a read that would return entries at
        // once must not count as blocked, or every retry would try to wake it.
        let found_empty = |streams: &[usize]| streams.iter().all(|&i| self.found_empty[i]);
        if free >= n {
            return ReadPlan {
                block: found_empty(&in_rotation),
                streams: sorted(in_rotation),
                count: (free / n).min(max_count).max(1),
            };
        }
        let window: Vec<usize> = in_rotation[..free].to_vec();
        let others_empty = found_empty(&in_rotation[free..]);
        if others_empty && places >= n {
            // Waiting on the window alone would hold back entries that arrive on the
            // others meanwhile: one entry of each stream instead.
            return ReadPlan {
                block: found_empty(&in_rotation),
                streams: sorted(in_rotation),
                count: 1,
            };
        }
        if let Some(&last) = window.last() {
            self.rotation = (last + 1) % total;
        }
        ReadPlan {
            block: found_empty(&in_rotation),
            streams: window,
            count: 1,
        }
    }

    /// Records what a read of `stream_index` found: `full` when it returned as many
    /// entries as asked for (so more may be waiting).
    pub(crate) fn record(&mut self, stream_index: usize, full: bool) {
        self.found_empty[stream_index] = !full;
    }
}

fn sorted(mut streams: Vec<usize>) -> Vec<usize> {
    streams.sort_unstable();
    streams
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plans reads over streams that all have entries, for a sequence of free counts, and
    /// returns the streams in the order they were read.
    fn reads(streams: usize, free_counts: &[usize]) -> Vec<usize> {
        let mut window = ReadWindow::new(streams);
        let active = vec![true; streams];
        let mut order = Vec::new();
        for &free in free_counts {
            let plan = window.plan(&active, free, 1000, 100);
            assert!(
                plan.count * plan.streams.len() <= free.max(1),
                "{plan:?} asks for more than {free} free slots"
            );
            for &stream in &plan.streams {
                window.record(stream, true);
            }
            order.extend(plan.streams);
        }
        order
    }

    #[test]
    fn partial_reads_go_round_every_stream_in_turn_whatever_the_free_counts() {
        // Free counts alternating 1 and 3 over 4 streams once starved stream 3.
        let order = reads(4, &[1, 3, 1, 3, 1, 3]);
        assert_eq!(order, [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3]);
        let order = reads(3, &[2, 1, 2, 2, 1, 1]);
        assert_eq!(order, [0, 1, 2, 0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn a_read_of_every_stream_shares_the_free_slots_out() {
        let mut window = ReadWindow::new(3);
        let plan = window.plan(&[true; 3], 64, 1000, 100);
        assert_eq!(plan.streams, [0, 1, 2]);
        assert_eq!(plan.count, 21);
        assert!(!plan.block, "nothing is known to be empty yet");
        for stream in 0..3 {
            window.record(stream, false);
        }
        let plan = window.plan(&[true; 3], 64, 1000, 10);
        assert_eq!(plan.count, 10, "no more than max_count per stream");
        assert!(plan.block, "every stream was found empty");
    }

    #[test]
    fn blocks_only_once_every_stream_was_found_empty_and_then_on_all() {
        let mut window = ReadWindow::new(2);
        let active = [true, true];
        // A busy stream 0 next to an idle stream 1, one free slot.
        let plan = window.plan(&active, 1, 1000, 100);
        assert_eq!((plan.streams.as_slice(), plan.block), (&[0][..], false));
        window.record(0, true);
        let plan = window.plan(&active, 1, 1000, 100);
        assert_eq!((plan.streams.as_slice(), plan.block), (&[1][..], false));
        window.record(1, false);
        // The other stream was found empty: one read asks both, one entry each, without
        // waiting while stream 0 has entries.
        let plan = window.plan(&active, 1, 1000, 100);
        assert_eq!((plan.streams.as_slice(), plan.count), (&[0, 1][..], 1));
        assert!(!plan.block, "stream 0 had entries");
        window.record(0, false);
        window.record(1, false);
        let plan = window.plan(&active, 1, 1000, 100);
        assert_eq!((plan.streams.as_slice(), plan.block), (&[0, 1][..], true));
        // Without a place for an entry of each, it waits on its window alone.
        let plan = window.plan(&active, 1, 1, 100);
        assert_eq!(plan.streams.len(), 1);
        assert!(plan.block);
    }

    #[test]
    fn paused_streams_are_left_out() {
        let mut window = ReadWindow::new(3);
        let plan = window.plan(&[true, false, true], 64, 1000, 100);
        assert_eq!(plan.streams, [0, 2]);
        assert_eq!(plan.count, 32);
        let plan = window.plan(&[false, true, false], 1, 1000, 100);
        assert_eq!(plan.streams, [1]);
    }
}
