//! Headers: metadata that travels with an entry next to the event, in reserved fields.

use std::fmt;

use serde::Serialize;

use crate::broker::EntryFields;
use crate::codec::EncodedField;
use crate::error::{Error, Result};

/// The prefix of the stream field that carries a header: header `request-id` is stored
/// as field `@h.request-id`. It lies in the `@` namespace the bus reserves for itself
/// (an event's own field `@x` is stored as `@@x`), so headers never collide with fields.
pub(crate) const HEADER_FIELD_PREFIX: &str = "@h.";

/// Metadata that travels with an entry without being part of the typed event: a request
/// id, a tenant, trace context.
///
/// An ordered list of name-value pairs, with at most one value per name. Names are case
/// sensitive (lowercase ones, as HTTP/2 writes them, read best in `redis-cli`), made of
/// the characters of an HTTP header name: ASCII letters, digits and
/// ``!#$%&'*+-.^_`|~``. Values are any text.
///
/// Publish them with [`EventBus::publish_with_headers`](crate::EventBus::publish_with_headers);
/// a handler reads them from [`Context::headers`](crate::Context::headers). Dead letters
/// keep them ([`DeadLetter::headers`](crate::DeadLetter::headers)) and a replay restores
/// them. With the cargo feature `opentelemetry`, `Headers` is an OpenTelemetry
/// `Injector` and `Extractor`, the carrier of the trace context publishes write.
///
/// # Examples
///
/// ```
/// let mut headers = slim_bus::Headers::new();
/// headers.insert("request-id", "r-42");
/// headers.insert("tenant", "acme");
/// assert_eq!(headers.get("request-id"), Some("r-42"));
/// assert_eq!(headers.len(), 2);
///
/// let same: slim_bus::Headers = [("request-id", "r-42"), ("tenant", "acme")].into_iter().collect();
/// assert_eq!(headers, same);
/// ```
#[derive(Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Headers {
    #[serde(serialize_with = "serialize_as_map")]
    pairs: Vec<(String, String)>,
}

/// What [`Context::headers`](crate::Context::headers) lends when an entry has none.
pub(crate) static NO_HEADERS: Headers = Headers::new();

impl Headers {
    /// No headers.
    pub const fn new() -> Self {
        Headers { pairs: Vec::new() }
    }

    /// Sets header `name` to `value`, returning its previous value. A name already there
    /// keeps its place in the order; a new one goes last.
    ///
    /// Names are checked when the headers are published: an invalid one fails the
    /// publish with [`Error::InvalidHeader`].
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) -> Option<String> {
        let name = name.into();
        let value = value.into();
        match self.pairs.iter_mut().find(|(n, _)| *n == name) {
            Some((_, old)) => Some(std::mem::replace(old, value)),
            None => {
                self.pairs.push((name, value));
                None
            }
        }
    }

    /// The value of header `name`, if there is one.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, value)| value.as_str())
    }

    /// Removes header `name`, returning its value.
    pub fn remove(&mut self, name: &str) -> Option<String> {
        let index = self.pairs.iter().position(|(n, _)| n == name)?;
        Some(self.pairs.remove(index).1)
    }

    /// The headers as `(name, value)`, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &str)> + '_ {
        self.pairs
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
    }

    /// How many headers there are.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Fails with [`Error::InvalidHeader`] for the first name that cannot be stored.
    pub(crate) fn validate(&self) -> Result<()> {
        for (name, _) in &self.pairs {
            if let Some(reason) = invalid_name(name) {
                return Err(Error::InvalidHeader {
                    name: name.clone(),
                    reason,
                });
            }
        }
        Ok(())
    }

    /// Appends the headers' stream fields to `fields`.
    pub(crate) fn encode_into(&self, fields: &mut Vec<EncodedField>) {
        fields.extend(self.pairs.iter().map(|(name, value)| {
            (
                format!("{HEADER_FIELD_PREFIX}{name}").into(),
                value.as_bytes().to_vec(),
            )
        }));
    }

    /// The headers of a delivered entry. Most entries have none, and the reply parser
    /// noted whether any name starts with `@`: that spares them a walk through their
    /// fields, which cost the `consume` benchmark about 8% of its instructions.
    pub(crate) fn of_entry(fields: &EntryFields) -> Self {
        if !fields.has_reserved_names() {
            return Headers::new();
        }
        Headers::decode(fields.pairs())
    }

    /// The headers among an entry's stored fields; values that are not UTF-8 are read
    /// lossily.
    pub(crate) fn decode<'a>(fields: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> Self {
        let prefix = HEADER_FIELD_PREFIX.as_bytes();
        let mut headers = Headers::new();
        for (name, value) in fields {
            if let Some(name) = name.strip_prefix(prefix) {
                headers.insert(
                    String::from_utf8_lossy(name),
                    String::from_utf8_lossy(value),
                );
            }
        }
        headers
    }
}

/// Why `name` cannot be a header name, if it cannot.
fn invalid_name(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("header names must not be empty");
    }
    // RFC 9110's `tchar`: what an HTTP header name is made of. No whitespace, controls,
    // separators or non-ASCII text, so a header reads back as written, in `redis-cli` too.
    let is_tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if !name.bytes().all(is_tchar) {
        return Some(
            "header names are made of ASCII letters, digits and !#$%&'*+-.^_`|~ (no spaces, `:` or other separators)",
        );
    }
    None
}

fn serialize_as_map<S: serde::Serializer>(
    pairs: &[(String, String)],
    serializer: S,
) -> std::result::Result<S::Ok, S::Error> {
    serializer.collect_map(pairs.iter().map(|(name, value)| (name, value)))
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<N: Into<String>, V: Into<String>> FromIterator<(N, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(iter: I) -> Self {
        let mut headers = Headers::new();
        headers.extend(iter);
        headers
    }
}

impl<N: Into<String>, V: Into<String>> Extend<(N, V)> for Headers {
    fn extend<I: IntoIterator<Item = (N, V)>>(&mut self, iter: I) {
        for (name, value) in iter {
            self.insert(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_replaces_in_place_and_appends_new_names() {
        let mut headers: Headers = [("a", "1"), ("b", "2"), ("a", "3")].into_iter().collect();
        assert_eq!(headers.iter().collect::<Vec<_>>(), [("a", "3"), ("b", "2")]);
        assert_eq!(headers.insert("c", "4"), None);
        assert_eq!(headers.remove("a"), Some("3".to_owned()));
        assert_eq!(headers.iter().collect::<Vec<_>>(), [("b", "2"), ("c", "4")]);
        assert_eq!(format!("{headers:?}"), r#"{"b": "2", "c": "4"}"#);
        assert_eq!(
            serde_json::to_string(&headers).ok().as_deref(),
            Some(r#"{"b":"2","c":"4"}"#)
        );
    }

    #[test]
    fn names_that_cannot_be_stored_are_rejected() {
        for good in ["request-id", "traceparent", "X_Tenant.v2", "a!#$%&'*+^`|~"] {
            assert!(invalid_name(good).is_none(), "{good}");
        }
        for bad in ["", "request id", "a:b", "tab\t", "é", "new\nline", "{x}"] {
            assert!(invalid_name(bad).is_some(), "{bad:?}");
        }
        let headers: Headers = [("ok", "1"), ("not ok", "2")].into_iter().collect();
        let error = headers.validate().err().map(|e| e.to_string());
        assert_eq!(
            error.as_deref(),
            Some(
                "invalid header name `not ok`: header names are made of ASCII letters, digits and !#$%&'*+-.^_`|~ (no spaces, `:` or other separators)"
            )
        );
    }

    #[test]
    fn headers_are_stored_under_their_prefix_and_read_back() {
        let headers: Headers = [("request-id", "r-1"), ("tenant", "é")]
            .into_iter()
            .collect();
        let mut fields: Vec<EncodedField> = vec![("user_id".into(), b"u1".to_vec())];
        headers.encode_into(&mut fields);
        let names: Vec<&str> = fields.iter().map(|(name, _)| &**name).collect();
        assert_eq!(names, ["user_id", "@h.request-id", "@h.tenant"]);
        let read = Headers::decode(
            fields
                .iter()
                .map(|(name, value)| (name.as_bytes(), value.as_slice())),
        );
        assert_eq!(read, headers);
        let delivered = EntryFields::from_pairs(
            fields
                .iter()
                .map(|(name, value)| (name.as_bytes(), value.as_slice())),
        );
        assert_eq!(Headers::of_entry(&delivered), headers);
        let plain = EntryFields::from_pairs([("user_id", "u1"), ("email", "a@b.c")]);
        assert!(!plain.has_reserved_names());
        assert!(Headers::of_entry(&plain).is_empty());
    }
}
