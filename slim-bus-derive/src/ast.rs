//! The typed model the macros work on, built from syn's syntax tree and the parsed
//! attributes. Building it reports only what cannot be modelled; `valid` checks the rest.

use proc_macro2::{Span, TokenStream};
use quote::ToTokens;
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{
    Attribute, Data, DeriveInput, Fields, FnArg, Generics, Ident, ImplItem, ItemFn, ItemImpl,
    LitInt, LitStr, Pat, PatType, Path, Receiver, Signature, Type,
};

use std::time::Duration;

use crate::attr::{self, ArgsOf, MacroArgs};
use crate::ctxt::Errors;

/// `#[derive(Event)]` input.
pub(crate) struct Event<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) generics: &'a Generics,
    pub(crate) shape: Shape,
    pub(crate) stream: Option<LitStr>,
    /// `max_len = N`, checked to be a whole number of at least 1.
    pub(crate) max_len: Option<LitInt>,
    /// `partitions = N`, checked to be a whole number of at least 1.
    pub(crate) partitions: Option<LitInt>,
    /// `key = "field"`, as written.
    pub(crate) key: Option<LitStr>,
    /// The name the key field has in the stream entry; set by `valid` once the key is
    /// known to name a field.
    pub(crate) key_wire_name: Option<String>,
    /// The named fields, each with the name serde writes it under.
    pub(crate) fields: Vec<FieldName>,
    pub(crate) krate: Path,
    /// The `flatten` keys of `#[serde(...)]` attributes on its fields.
    pub(crate) flattened: Vec<Path>,
}

/// A field of an event, by the name it has in Rust and in the stream entry.
pub(crate) struct FieldName {
    pub(crate) rust: String,
    pub(crate) wire: String,
    /// The `skip` or `skip_serializing` of its `#[serde(...)]`: it never reaches an entry.
    pub(crate) skipped: Option<Path>,
}

/// What kind of type the event is; only structs with named fields can be events.
pub(crate) enum Shape {
    NamedStruct,
    /// Anything else, with the tokens to point at and advice on what to write instead.
    Unsupported {
        at: TokenStream,
        instead: &'static str,
    },
}

impl<'a> Event<'a> {
    pub(crate) fn from_syn(input: &'a DeriveInput, errors: &mut Errors) -> Self {
        let attrs = attr::event_attrs(&input.attrs, errors);
        let mut flattened = Vec::new();
        let mut field_names = Vec::new();
        let shape = match &input.data {
            Data::Struct(data) => match &data.fields {
                Fields::Named(fields) => {
                    flattened = fields
                        .named
                        .iter()
                        .flat_map(|field| attr::serde_keys(&field.attrs, &["flatten"]))
                        .collect();
                    let rename_all = attr::serde_rename(&input.attrs, "rename_all");
                    field_names = fields
                        .named
                        .iter()
                        .filter_map(|field| field.ident.as_ref().map(|ident| (ident, field)))
                        .map(|(ident, field)| {
                            let rust = ident.unraw().to_string();
                            let wire = attr::serde_rename(&field.attrs, "rename")
                                .unwrap_or_else(|| renamed(&rust, rename_all.as_deref()));
                            let skipped =
                                attr::serde_keys(&field.attrs, &["skip", "skip_serializing"])
                                    .into_iter()
                                    .next();
                            FieldName {
                                rust,
                                wire,
                                skipped,
                            }
                        })
                        .collect();
                    Shape::NamedStruct
                }
                Fields::Unnamed(fields) => Shape::Unsupported {
                    at: fields.to_token_stream(),
                    instead: "name its fields, like `struct UserDeleted { user_id: String }`",
                },
                Fields::Unit => Shape::Unsupported {
                    at: input.ident.to_token_stream(),
                    instead: "give it named fields, like `struct UserDeleted { user_id: String }`",
                },
            },
            Data::Enum(data) => Shape::Unsupported {
                at: data.enum_token.to_token_stream(),
                instead: "put the enum in a field of a struct, like `struct OrderChanged { status: OrderStatus }`",
            },
            Data::Union(data) => Shape::Unsupported {
                at: data.union_token.to_token_stream(),
                instead: "use a struct with named fields",
            },
        };
        Event {
            ident: &input.ident,
            generics: &input.generics,
            shape,
            stream: attrs.stream,
            max_len: attrs.max_len,
            partitions: attrs.partitions,
            key: attrs.key,
            key_wire_name: None,
            fields: field_names,
            krate: attrs.krate.unwrap_or_else(default_crate),
            flattened,
        }
    }
}

/// The name serde's `rename_all = "rule"` gives the field `field` (a snake_case Rust
/// name), as serde's `RenameRule::apply_to_field` does; unchanged for no rule or one serde
/// does not know (serde reports that).
fn renamed(field: &str, rule: Option<&str>) -> String {
    let pascal = || {
        field
            .split('_')
            .map(|word| {
                let mut chars = word.chars();
                chars.next().map_or_else(String::new, |first| {
                    first.to_ascii_uppercase().to_string() + chars.as_str()
                })
            })
            .collect::<String>()
    };
    match rule {
        Some("UPPERCASE" | "SCREAMING_SNAKE_CASE") => field.to_ascii_uppercase(),
        Some("PascalCase") => pascal(),
        Some("camelCase") => {
            let pascal = pascal();
            let mut chars = pascal.chars();
            chars.next().map_or_else(String::new, |first| {
                first.to_ascii_lowercase().to_string() + chars.as_str()
            })
        }
        Some("kebab-case") => field.replace('_', "-"),
        Some("SCREAMING-KEBAB-CASE") => field.to_ascii_uppercase().replace('_', "-"),
        _ => field.to_owned(),
    }
}

/// The path generated code names slim-bus by, unless `crate = "..."` says otherwise.
pub(crate) fn default_crate() -> Path {
    syn::parse_quote!(::slim_bus)
}

/// Whether a handler is a free function or a method of a service.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Free,
    Method,
}

/// One handler: a `#[stream]` free function, or a `#[stream]` method in `#[handlers]`.
pub(crate) struct Handler {
    pub(crate) kind: Kind,
    /// The function as written (a method's `#[stream]` attribute removed).
    pub(crate) sig: Signature,
    /// The stream the attribute names; `valid` clears it when the name is invalid.
    pub(crate) stream: Option<LitStr>,
    /// Whether the attribute names a stream at all (valid or not).
    pub(crate) names_stream: bool,
    /// Where the `#[stream]` attribute is, for errors about the handler as a whole.
    pub(crate) attr_span: Span,
    /// Whether the signature can be turned into a handler; set by `valid`.
    pub(crate) usable: bool,
    /// `max_deliveries = N`, overriding the bus's.
    pub(crate) max_deliveries: Option<LitInt>,
    /// `timeout = "5s"`, overriding the bus's handler timeout.
    pub(crate) timeout: Option<(LitStr, Duration)>,
    /// `batch = N`: a batch handler, taking `Vec<(Event, Context)>`.
    pub(crate) batch: Option<LitInt>,
}

impl Handler {
    fn new(kind: Kind, sig: Signature, args: MacroArgs, attr_span: Span) -> Self {
        Handler {
            kind,
            sig,
            names_stream: args.stream.is_some(),
            stream: args.stream,
            attr_span,
            usable: false,
            max_deliveries: args.max_deliveries,
            timeout: args.timeout,
            batch: args.batch,
        }
    }

    pub(crate) fn name(&self) -> &Ident {
        &self.sig.ident
    }

    pub(crate) fn receiver(&self) -> Option<&Receiver> {
        self.sig.receiver()
    }

    /// The arguments after the receiver: the event, then the context.
    pub(crate) fn args(&self) -> Vec<&PatType> {
        self.sig
            .inputs
            .iter()
            .filter_map(|arg| match arg {
                FnArg::Typed(arg) => Some(arg),
                FnArg::Receiver(_) => None,
            })
            .collect()
    }

    /// The event type; only meaningful on a usable handler.
    pub(crate) fn event_ty(&self) -> Option<&Type> {
        self.args().first().map(|arg| &*arg.ty)
    }

    /// For a batch handler, `E` of its argument `Vec<(E, Context)>`, and the context's
    /// type, when the argument has that shape.
    pub(crate) fn batch_parts(&self) -> Option<(&Type, &Type)> {
        let Type::Path(path) = self.args().first().map(|arg| &*arg.ty)? else {
            return None;
        };
        let segment = path.path.segments.last()?;
        if path.qself.is_some() || segment.ident != "Vec" {
            return None;
        }
        let syn::PathArguments::AngleBracketed(args) = &segment.arguments else {
            return None;
        };
        let mut args = args.args.iter();
        let (Some(syn::GenericArgument::Type(Type::Tuple(tuple))), None) =
            (args.next(), args.next())
        else {
            return None;
        };
        let mut elems = tuple.elems.iter();
        match (elems.next(), elems.next(), elems.next()) {
            (Some(event), Some(context), None) => Some((event, context)),
            _ => None,
        }
    }

    /// The context argument's type, if the handler takes one.
    pub(crate) fn context_ty(&self) -> Option<&Type> {
        self.args().get(1).map(|arg| &*arg.ty)
    }

    /// The names the arguments bind, for checks against clashes.
    pub(crate) fn arg_idents(&self) -> impl Iterator<Item = &Ident> {
        self.sig.inputs.iter().filter_map(|arg| match arg {
            FnArg::Typed(PatType { pat, .. }) => match &**pat {
                Pat::Ident(pat) => Some(&pat.ident),
                _ => None,
            },
            FnArg::Receiver(_) => None,
        })
    }
}

/// A `#[stream]` free function.
pub(crate) struct FreeHandler {
    pub(crate) item: ItemFn,
    pub(crate) handler: Handler,
    pub(crate) krate: Path,
}

impl FreeHandler {
    pub(crate) fn from_syn(args: TokenStream, item: ItemFn, errors: &mut Errors) -> Self {
        let mut args = attr::macro_args(args, ArgsOf::FreeStream, errors);
        let krate = args.krate.take().unwrap_or_else(default_crate);
        let handler = Handler::new(Kind::Free, item.sig.clone(), args, Span::call_site());
        FreeHandler {
            item,
            handler,
            krate,
        }
    }
}

/// A `#[handlers]` impl block.
pub(crate) struct Service {
    /// The impl block as it will be emitted: every `#[stream]` attribute removed.
    pub(crate) item: ItemImpl,
    pub(crate) handlers: Vec<Handler>,
    pub(crate) krate: Path,
}

impl Service {
    pub(crate) fn from_syn(args: TokenStream, mut item: ItemImpl, errors: &mut Errors) -> Self {
        let args = attr::macro_args(args, ArgsOf::Handlers, errors);
        let mut handlers = Vec::new();
        for impl_item in &mut item.items {
            let (attrs, method) = match impl_item {
                ImplItem::Fn(method) => (&mut method.attrs, Some(&method.sig)),
                ImplItem::Const(item) => (&mut item.attrs, None),
                ImplItem::Type(item) => (&mut item.attrs, None),
                ImplItem::Macro(item) => (&mut item.attrs, None),
                _ => continue,
            };
            let stream_attrs = take_stream_attrs(attrs);
            let Some(first) = stream_attrs.first() else {
                continue;
            };
            let Some(sig) = method else {
                errors.spanned(
                    first,
                    "`#[stream]` goes on handler methods: `#[stream] async fn on_event(&self, event: MyEvent)`",
                );
                continue;
            };
            for extra in &stream_attrs[1..] {
                errors.spanned(
                    extra,
                    "a handler reads one stream: keep one `#[stream]` attribute",
                );
            }
            let parsed = attr::method_stream_attr(first, errors);
            handlers.push(Handler::new(
                Kind::Method,
                sig.clone(),
                parsed,
                first.path().span(),
            ));
        }
        Service {
            item,
            handlers,
            krate: args.krate.unwrap_or_else(default_crate),
        }
    }

    pub(crate) fn self_ty(&self) -> &Type {
        &self.item.self_ty
    }
}

fn take_stream_attrs(attrs: &mut Vec<Attribute>) -> Vec<Attribute> {
    let (stream, rest): (Vec<_>, Vec<_>) = std::mem::take(attrs)
        .into_iter()
        .partition(attr::is_stream_attr);
    *attrs = rest;
    stream
}

/// A type as a user would write it, for messages: `Vec<String>`, not `Vec < String >`.
pub(crate) fn type_text(ty: &Type) -> String {
    let text = ty.to_token_stream().to_string();
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ' ' {
            let prev = out.chars().last();
            let next = chars.peek().copied();
            let tight_before = matches!(next, Some('<' | '>' | ',' | ';' | ':' | ')' | ']'));
            let tight_after = matches!(prev, Some('<' | ':' | '(' | '[' | '&'));
            if tight_before || tight_after {
                continue;
            }
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_renamed_as_serde_renames_them() {
        let cases = [
            (None, "order_id"),
            (Some("lowercase"), "order_id"),
            (Some("snake_case"), "order_id"),
            (Some("UPPERCASE"), "ORDER_ID"),
            (Some("SCREAMING_SNAKE_CASE"), "ORDER_ID"),
            (Some("PascalCase"), "OrderId"),
            (Some("camelCase"), "orderId"),
            (Some("kebab-case"), "order-id"),
            (Some("SCREAMING-KEBAB-CASE"), "ORDER-ID"),
        ];
        for (rule, name) in cases {
            assert_eq!(renamed("order_id", rule), name, "{rule:?}");
        }
    }

    #[test]
    fn types_print_as_written() {
        let cases: [(Type, &str); 4] = [
            (syn::parse_quote!(UserCreated), "UserCreated"),
            (
                syn::parse_quote!(std::collections::HashMap<String, String>),
                "std::collections::HashMap<String, String>",
            ),
            (
                syn::parse_quote!(&'static mut Vec<(u8, u16)>),
                "&'static mut Vec<(u8, u16)>",
            ),
            (syn::parse_quote!([u8; 4]), "[u8; 4]"),
        ];
        for (ty, text) in cases {
            assert_eq!(type_text(&ty), text);
        }
    }
}
