//! Parsing of the macros' attributes: `#[event(...)]`, `#[stream(...)]`, `#[handlers(...)]`.
//!
//! Parsing only reads what is written; whether a stream name is acceptable is up to
//! `valid`.

use proc_macro2::TokenStream;
use std::time::Duration;
use syn::ext::IdentExt;
use syn::meta::ParseNestedMeta;
use syn::parse::{ParseStream, Parser};

use syn::{Attribute, Expr, ExprLit, Ident, Lit, LitInt, LitStr, Meta, Path, Token};

use crate::ctxt::Errors;

/// `#[event(stream = "...", max_len = N, partitions = N, key = "...", crate = "...")]` on a
/// derived event.
#[derive(Default)]
pub(crate) struct EventAttrs {
    pub(crate) stream: Option<LitStr>,
    /// `max_len = 100_000`: the cap on the stream's length at publish.
    pub(crate) max_len: Option<LitInt>,
    /// `partitions = 8`: the stream is partitioned into this many streams.
    pub(crate) partitions: Option<LitInt>,
    /// `key = "order_id"`: the field whose value picks the partition.
    pub(crate) key: Option<LitStr>,
    pub(crate) krate: Option<Path>,
}

pub(crate) fn event_attrs(attrs: &[Attribute], errors: &mut Errors) -> EventAttrs {
    let mut parsed = EventAttrs::default();
    for attr in attrs.iter().filter(|attr| attr.path().is_ident("event")) {
        let result = attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("stream") {
                let lit = string_value(&meta, "stream = \"user.created\"")?;
                set_once(&mut parsed.stream, lit, &meta.path, "stream", errors);
            } else if meta.path.is_ident("max_len") {
                if let Some(lit) = event_max_len(&meta, errors)? {
                    set_once(&mut parsed.max_len, lit, &meta.path, "max_len", errors);
                }
            } else if meta.path.is_ident("partitions") {
                if let Some(lit) = event_partitions(&meta, errors)? {
                    set_once(&mut parsed.partitions, lit, &meta.path, "partitions", errors);
                }
            } else if meta.path.is_ident("key") {
                let lit = string_value(&meta, "key = \"order_id\"")?;
                set_once(&mut parsed.key, lit, &meta.path, "key", errors);
            } else if meta.path.is_ident("crate") {
                let lit = string_value(&meta, "crate = \"my_crate::slim_bus\"")?;
                if let Some(path) = crate_path(&lit, errors) {
                    set_once(&mut parsed.krate, path, &meta.path, "crate", errors);
                }
            } else {
                errors.spanned(
                    &meta.path,
                    format_args!(
                        "unknown `event` attribute `{}`: expected `stream = \"...\"`, `max_len = N`, `partitions = N`, `key = \"...\"` or `crate = \"...\"`",
                        path_text(&meta.path)
                    ),
                );
                skip_value(&meta)?;
            }
            Ok(())
        });
        if let Err(error) = result {
            errors.push(error);
        }
    }
    parsed
}

/// `max_len = N`: a whole number of at least 1 that fits a `usize`; `None` after reporting
/// anything else.
fn event_max_len(meta: &ParseNestedMeta<'_>, errors: &mut Errors) -> syn::Result<Option<LitInt>> {
    positive_number::<usize>(
        meta,
        errors,
        "max_len = 100_000",
        "`max_len` must be at least 1: a cap of 0 would delete every entry as it is published",
    )
}

/// `partitions = N`: a whole number of at least 1 that fits a `u32`; `None` after
/// reporting anything else.
fn event_partitions(
    meta: &ParseNestedMeta<'_>,
    errors: &mut Errors,
) -> syn::Result<Option<LitInt>> {
    positive_number::<u32>(
        meta,
        errors,
        "partitions = 8",
        "`partitions` must be at least 1: a stream of 0 partitions could hold no entry",
    )
}

/// The value of `meta` as a whole number of at least 1 that fits `N`, else `None` after
/// reporting `if_zero`, or what to write instead (`example`).
fn positive_number<N>(
    meta: &ParseNestedMeta<'_>,
    errors: &mut Errors,
    example: &str,
    if_zero: &str,
) -> syn::Result<Option<LitInt>>
where
    N: std::str::FromStr + From<u8> + PartialEq,
    N::Err: std::fmt::Display,
{
    let value: Expr = meta.value()?.parse()?;
    let lit = match value {
        Expr::Lit(ExprLit {
            lit: Lit::Int(lit), ..
        }) => lit,
        other => {
            errors.spanned(other, format_args!("expected a whole number: `{example}`"));
            return Ok(None);
        }
    };
    match lit.base10_parse::<N>() {
        Ok(number) if number == N::from(0) => {
            errors.spanned(&lit, if_zero);
            Ok(None)
        }
        Ok(_) => Ok(Some(lit)),
        Err(_) => {
            errors.spanned(
                &lit,
                format_args!(
                    "expected a whole number that fits a {}: `{example}`",
                    std::any::type_name::<N>()
                ),
            );
            Ok(None)
        }
    }
}

/// The name serde gives a field or the rule it renames fields by: the value of `rename`
/// (or `rename_all`, for `key = "rename_all"`) in `#[serde(...)]` attributes, also in
/// its `(serialize = "...")` form. What cannot be parsed is left for serde to report.
pub(crate) fn serde_rename(attrs: &[Attribute], key: &str) -> Option<String> {
    let mut renamed = None;
    for attr in attrs.iter().filter(|attr| attr.path().is_ident("serde")) {
        let _ = attr.parse_nested_meta(|meta| {
            if !meta.path.is_ident(key) {
                return skip_value(&meta);
            }
            if meta.input.peek(Token![=]) {
                if let Expr::Lit(ExprLit {
                    lit: Lit::Str(lit), ..
                }) = meta.value()?.parse()?
                {
                    renamed = Some(lit.value());
                }
            } else if meta.input.peek(syn::token::Paren) {
                meta.parse_nested_meta(|nested| {
                    if nested.path.is_ident("serialize")
                        && let Expr::Lit(ExprLit {
                            lit: Lit::Str(lit), ..
                        }) = nested.value()?.parse()?
                    {
                        renamed = Some(lit.value());
                        return Ok(());
                    }
                    skip_value(&nested)
                })?;
            }
            Ok(())
        });
    }
    renamed
}

/// The keys named `names` (e.g. `flatten`) in a field's `#[serde(...)]` attributes. Other
/// serde keys are serde's business; what cannot be parsed here is left for serde to report.
pub(crate) fn serde_keys(attrs: &[Attribute], names: &[&str]) -> Vec<Path> {
    let mut keys = Vec::new();
    for attr in attrs.iter().filter(|attr| attr.path().is_ident("serde")) {
        let _ = attr.parse_nested_meta(|meta| {
            if names.iter().any(|name| meta.path.is_ident(name)) {
                keys.push(meta.path.clone());
            }
            skip_value(&meta)
        });
    }
    keys
}

/// The arguments of `#[stream(...)]` or `#[handlers(...)]`.
#[derive(Default)]
pub(crate) struct MacroArgs {
    /// `#[stream("user.created")]`: the stream name, written first.
    pub(crate) stream: Option<LitStr>,
    /// `crate = "..."`.
    pub(crate) krate: Option<Path>,
    /// `max_deliveries = 3`.
    pub(crate) max_deliveries: Option<LitInt>,
    /// `timeout = "5s"`, parsed.
    pub(crate) timeout: Option<(LitStr, Duration)>,
    /// `batch = 100`: a batch handler of at most this many entries per call.
    pub(crate) batch: Option<LitInt>,
}

/// Which arguments an attribute accepts.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum ArgsOf {
    /// `#[stream]` on a free function: a stream name and `crate`.
    FreeStream,
    /// `#[stream]` on a method inside `#[handlers]`: a stream name only.
    MethodStream,
    /// `#[handlers]`: `crate` only.
    Handlers,
}

pub(crate) fn macro_args(tokens: TokenStream, of: ArgsOf, errors: &mut Errors) -> MacroArgs {
    let mut args = MacroArgs::default();
    let parser = |input: ParseStream<'_>| -> syn::Result<()> {
        let mut first = true;
        while !input.is_empty() {
            if input.peek(LitStr) {
                let lit: LitStr = input.parse()?;
                if of == ArgsOf::Handlers {
                    errors.spanned(
                        &lit,
                        "`#[handlers]` takes no stream name: put `#[stream(\"...\")]` on each handler method",
                    );
                } else if !first || args.stream.is_some() {
                    errors.spanned(
                        &lit,
                        "a handler reads one stream: write a single name, first, like `#[stream(\"user.created\")]`",
                    );
                } else {
                    args.stream = Some(lit);
                }
            } else if input.peek(Ident::peek_any) && input.peek2(Token![=]) {
                let key = input.call(Ident::parse_any)?;
                input.parse::<Token![=]>()?;
                let value: Expr = input.parse()?;
                macro_arg(&mut args, of, &key, value, errors);
            } else {
                let rest: TokenStream = input.parse()?;
                let expected = match of {
                    ArgsOf::Handlers => "expected `crate = \"...\"` or nothing: `#[handlers]`",
                    ArgsOf::FreeStream | ArgsOf::MethodStream => {
                        "expected the stream name as a string literal, like `#[stream(\"user.created\")]`, or nothing (`#[stream]`) to use the event type's stream"
                    }
                };
                errors.spanned(rest, expected);
                return Ok(());
            }
            first = false;
            if input.is_empty() {
                break;
            }
            input.parse::<Token![,]>()?;
        }
        Ok(())
    };
    if let Err(error) = parser.parse2(tokens) {
        errors.push(error);
    }
    args
}

fn macro_arg(args: &mut MacroArgs, of: ArgsOf, key: &Ident, value: Expr, errors: &mut Errors) {
    let name = match of {
        ArgsOf::Handlers => "handlers",
        ArgsOf::FreeStream | ArgsOf::MethodStream => "stream",
    };
    if key == "crate" {
        if of == ArgsOf::MethodStream {
            errors.spanned(
                key,
                "set `crate` on the impl block, `#[handlers(crate = \"...\")]`, not on its methods",
            );
            return;
        }
        let Some(lit) = lit_str(value, "crate = \"my_crate::slim_bus\"", errors) else {
            return;
        };
        if let Some(path) = crate_path(&lit, errors) {
            let key_path = Path::from(key.clone());
            set_once(&mut args.krate, path, &key_path, "crate", errors);
        }
        return;
    }
    if of != ArgsOf::Handlers && key == "max_deliveries" {
        handler_max_deliveries(args, key, value, errors);
        return;
    }
    if of != ArgsOf::Handlers && key == "timeout" {
        handler_timeout(args, key, value, errors);
        return;
    }
    if of != ArgsOf::Handlers && key == "batch" {
        handler_batch(args, key, value, errors);
        return;
    }
    let hint = match of {
        ArgsOf::Handlers => "the only key is `crate = \"...\"`".to_owned(),
        ArgsOf::FreeStream => {
            "the keys are `max_deliveries = 3`, `timeout = \"5s\"`, `batch = 100` and `crate = \"...\"`, after the stream name, if any: `#[stream(\"user.created\", timeout = \"5s\")]`".to_owned()
        }
        ArgsOf::MethodStream => {
            "the keys are `max_deliveries = 3`, `timeout = \"5s\"` and `batch = 100`, after the stream name, if any: `#[stream(\"user.created\", timeout = \"5s\")]`".to_owned()
        }
    };
    errors.spanned(
        key,
        format_args!("unknown `{name}` attribute `{key}`: {hint}"),
    );
}

/// `max_deliveries = N`: a whole number of at least 1.
fn handler_max_deliveries(args: &mut MacroArgs, key: &Ident, value: Expr, errors: &mut Errors) {
    let example = "max_deliveries = 3";
    let lit = match value {
        Expr::Lit(ExprLit {
            lit: Lit::Int(lit), ..
        }) => lit,
        other => {
            errors.spanned(other, format_args!("expected a whole number: `{example}`"));
            return;
        }
    };
    match lit.base10_parse::<u64>() {
        Ok(0) => errors.spanned(
            &lit,
            "`max_deliveries` must be at least 1: the first delivery counts",
        ),
        Ok(_) => set_once(
            &mut args.max_deliveries,
            lit,
            &Path::from(key.clone()),
            "max_deliveries",
            errors,
        ),
        Err(_) => errors.spanned(
            &lit,
            format_args!("expected a whole number that fits a u64: `{example}`"),
        ),
    }
}

/// `batch = N`: a whole number of at least 1.
fn handler_batch(args: &mut MacroArgs, key: &Ident, value: Expr, errors: &mut Errors) {
    let example = "batch = 100";
    let lit = match value {
        Expr::Lit(ExprLit {
            lit: Lit::Int(lit), ..
        }) => lit,
        other => {
            errors.spanned(other, format_args!("expected a whole number: `{example}`"));
            return;
        }
    };
    match lit.base10_parse::<u32>() {
        Ok(parsed) => {
            if parsed == 0 {
                // Kept, so that the handler is still taken for a batch handler and this
                // is its only error.
                errors.spanned(
                    &lit,
                    "`batch` must be at least 1: the most entries per call",
                );
            }
            set_once(
                &mut args.batch,
                lit,
                &Path::from(key.clone()),
                "batch",
                errors,
            );
        }
        Err(_) => errors.spanned(
            &lit,
            format_args!("expected a whole number that fits a u32: `{example}`"),
        ),
    }
}

/// `timeout = "5s"`: a duration as config files write them, longer than zero.
fn handler_timeout(args: &mut MacroArgs, key: &Ident, value: Expr, errors: &mut Errors) {
    let example = "timeout = \"5s\"";
    let Some(lit) = lit_str(value, example, errors) else {
        return;
    };
    match humantime::parse_duration(&lit.value()) {
        Ok(duration) if duration.is_zero() => {
            errors.spanned(&lit, "the handler timeout must be longer than zero");
        }
        Ok(duration) => set_once(
            &mut args.timeout,
            (lit, duration),
            &Path::from(key.clone()),
            "timeout",
            errors,
        ),
        Err(error) => errors.spanned(
            &lit,
            format_args!(
                "`{}` is not a duration ({error}): write it like `\"5s\"`, `\"250ms\"` or `\"2m 30s\"`",
                lit.value()
            ),
        ),
    }
}

/// The arguments of a `#[stream]` attribute on a method inside `#[handlers]`, which that
/// macro parses itself (the attribute is inert there).
pub(crate) fn method_stream_attr(attr: &Attribute, errors: &mut Errors) -> MacroArgs {
    match &attr.meta {
        Meta::Path(_) => MacroArgs::default(),
        Meta::List(list) => macro_args(list.tokens.clone(), ArgsOf::MethodStream, errors),
        Meta::NameValue(name_value) => {
            errors.spanned(
                name_value,
                "write the stream name in parentheses: `#[stream(\"user.created\")]`",
            );
            MacroArgs::default()
        }
    }
}

/// Whether `attr` is a `#[stream]` attribute (also spelled `#[slim_bus::stream]`).
pub(crate) fn is_stream_attr(attr: &Attribute) -> bool {
    attr.path()
        .segments
        .last()
        .is_some_and(|segment| segment.ident == "stream")
}

fn string_value(meta: &ParseNestedMeta<'_>, example: &str) -> syn::Result<LitStr> {
    if !meta.input.peek(Token![=]) {
        return Err(meta.error(format_args!("expected a value: `{example}`")));
    }
    let value: Expr = meta.value()?.parse()?;
    match value {
        Expr::Lit(ExprLit {
            lit: Lit::Str(lit), ..
        }) => Ok(lit),
        other => Err(syn::Error::new_spanned(
            other,
            format_args!("expected a string literal: `{example}`"),
        )),
    }
}

fn lit_str(value: Expr, example: &str, errors: &mut Errors) -> Option<LitStr> {
    match value {
        Expr::Lit(ExprLit {
            lit: Lit::Str(lit), ..
        }) => Some(lit),
        other => {
            errors.spanned(
                other,
                format_args!("expected a string literal: `{example}`"),
            );
            None
        }
    }
}

/// Skips `= value` after an unknown key, so the keys after it are still checked.
fn skip_value(meta: &ParseNestedMeta<'_>) -> syn::Result<()> {
    if meta.input.peek(Token![=]) {
        meta.value()?.parse::<Expr>()?;
    } else if meta.input.peek(syn::token::Paren) {
        let _ = meta.parse_nested_meta(|nested| skip_value(&nested));
    }
    Ok(())
}

fn crate_path(lit: &LitStr, errors: &mut Errors) -> Option<Path> {
    match lit.parse_with(Path::parse_mod_style) {
        Ok(path) => Some(path),
        Err(_) => {
            errors.spanned(
                lit,
                "`crate` must be the path slim-bus is re-exported at, like `crate = \"my_crate::slim_bus\"`",
            );
            None
        }
    }
}

fn set_once<T>(slot: &mut Option<T>, value: T, key: &Path, name: &str, errors: &mut Errors) {
    if slot.is_some() {
        errors.spanned(key, format_args!("`{name}` is given twice: keep one"));
    } else {
        *slot = Some(value);
    }
}

fn path_text(path: &Path) -> String {
    let segments: Vec<String> = path
        .segments
        .iter()
        .map(|segment| segment.ident.to_string())
        .collect();
    segments.join("::")
}

#[cfg(test)]
mod tests {
    use quote::{ToTokens, quote};

    use super::*;

    fn parse(tokens: TokenStream, of: ArgsOf) -> (MacroArgs, String) {
        let mut errors = Errors::default();
        let args = macro_args(tokens, of, &mut errors);
        (args, errors.to_compile_errors().to_string())
    }

    #[test]
    fn stream_arguments_take_a_name_first_and_a_crate() {
        let (args, errors) = parse(quote!(), ArgsOf::FreeStream);
        assert!(args.stream.is_none() && args.krate.is_none() && errors.is_empty());

        let (args, errors) = parse(
            quote!("user.created", crate = "my::bus"),
            ArgsOf::FreeStream,
        );
        assert_eq!(
            args.stream.map(|lit| lit.value()).as_deref(),
            Some("user.created")
        );
        assert_eq!(
            args.krate
                .map(|path| path.to_token_stream().to_string())
                .as_deref(),
            Some("my :: bus")
        );
        assert!(errors.is_empty(), "{errors}");
    }

    #[test]
    fn misplaced_and_unknown_arguments_are_reported_and_the_rest_is_kept() {
        let (args, errors) = parse(quote!(name = "x", "user.created"), ArgsOf::FreeStream);
        assert!(
            errors.contains("unknown `stream` attribute `name`"),
            "{errors}"
        );
        assert!(errors.contains("write a single name, first"), "{errors}");
        assert!(args.stream.is_none());

        let (_, errors) = parse(quote!("user.created"), ArgsOf::Handlers);
        assert!(errors.contains("takes no stream name"), "{errors}");

        let (_, errors) = parse(quote!(crate = "my::bus"), ArgsOf::MethodStream);
        assert!(errors.contains("set `crate` on the impl block"), "{errors}");
    }
}
