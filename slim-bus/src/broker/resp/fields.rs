//! The fields of a delivered entry, kept as the server sent them.

use super::decode::Cursor;
use super::encode::encode_bulk;

/// One entry's field names and values, kept as Redis sends them: RESP bulk strings one
/// after another in one buffer. A delivery then costs one allocation for its fields, not
/// one per name and value.
#[derive(Clone, PartialEq, Eq, Default)]
pub(crate) struct EntryFields {
    pub(super) resp: Vec<u8>,
    /// How many name-value pairs `resp` holds.
    pub(super) pairs: usize,
    /// Whether a name starts with `@`, noted while the names go by anyway, so that most
    /// deliveries need no second walk through their fields to look for headers.
    pub(super) reserved_names: bool,
}

impl EntryFields {
    pub(crate) fn from_pairs<N: AsRef<[u8]>, V: AsRef<[u8]>>(
        pairs: impl IntoIterator<Item = (N, V)>,
    ) -> Self {
        let mut fields = EntryFields::default();
        for (name, value) in pairs {
            fields.reserved_names |= name.as_ref().starts_with(b"@");
            encode_bulk(&mut fields.resp, name.as_ref());
            encode_bulk(&mut fields.resp, value.as_ref());
            fields.pairs += 1;
        }
        fields
    }

    /// Whether a field name starts with `@`: one of the bus's own fields (a header), or
    /// an event's field with such a name, escaped.
    pub(crate) fn has_reserved_names(&self) -> bool {
        self.reserved_names
    }

    /// The `(name, value)` pairs, in the entry's order.
    pub(crate) fn pairs(&self) -> FieldPairs<'_> {
        FieldPairs {
            cursor: Cursor {
                bytes: &self.resp,
                at: 0,
            },
            left: self.pairs,
        }
    }
}

impl std::fmt::Debug for EntryFields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.pairs().map(|(name, value)| {
                (
                    String::from_utf8_lossy(name),
                    String::from_utf8_lossy(value),
                )
            }))
            .finish()
    }
}

/// The pairs of an [`EntryFields`].
pub(crate) struct FieldPairs<'a> {
    cursor: Cursor<'a>,
    left: usize,
}

impl<'a> Iterator for FieldPairs<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        self.left = self.left.checked_sub(1)?;
        // `EntryFields` only ever holds as many pairs of whole bulk strings as it says.
        let pair = (
            self.cursor.bulk().ok().flatten()?,
            self.cursor.bulk().ok().flatten()?,
        );
        debug_assert!(self.left > 0 || self.cursor.remaining() == 0);
        Some(pair)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for FieldPairs<'_> {}
