//! Checks on the model, each reported as an error spanned on the offending tokens and
//! saying what to write instead. Checks clear what they reject (an invalid stream name
//! becomes no stream), so expansion still emits the impls and users see one error each.

use std::collections::HashMap;

use quote::ToTokens;
use syn::{FnArg, ImplItem, LitStr, Type};

use crate::ast::{Event, FieldName, Handler, Kind, Service, Shape};
use crate::ctxt::Errors;

pub(crate) fn event(event: &mut Event<'_>, errors: &mut Errors) {
    if let Shape::Unsupported { at, instead } = &event.shape {
        errors.spanned(
            at,
            format_args!(
                "Event can only be derived for structs with named fields, which become the fields of the stream entry: {instead}"
            ),
        );
    }
    for flatten in &event.flattened {
        errors.spanned(
            flatten,
            "an event can't have `#[serde(flatten)]` fields: a stream entry's fields carry no types, so serde hands a flattened struct every value as text, and a number or bool in it would fail to decode on every delivery; write its fields out in the event, or keep the nested struct in one field (stored as JSON)",
        );
    }
    if let Some(lit) = &event.stream {
        let instead = "write a name like `#[event(stream = \"user.created\")]`, or leave `stream` out and publish the event with `publish_to`";
        if !stream_name(lit, instead, errors) {
            event.stream = None;
        }
    }
    if let (Some(key), Shape::NamedStruct) = (&event.key, &event.shape) {
        let name = key.value();
        match event.fields.iter().find(|field| field.rust == name) {
            Some(FieldName {
                skipped: Some(skip),
                ..
            }) => errors.spanned(
                key,
                format_args!(
                    "`key` names the field `{name}`, which `#[serde({})]` keeps out of the stream entry: every entry would go to the same partition; name a field that is stored",
                    skip.to_token_stream()
                ),
            ),
            Some(field) => event.key_wire_name = Some(field.wire.clone()),
            None => {
                let fields: Vec<String> = event
                    .fields
                    .iter()
                    .map(|field| format!("`{}`", field.rust))
                    .collect();
                errors.spanned(
                    key,
                    format_args!(
                        "`key` names no field of `{}`: the key is the field whose value picks the partition, one of {}",
                        event.ident,
                        fields.join(", ")
                    ),
                );
            }
        }
    }
}

/// Checks a stream name; returns whether it is acceptable.
fn stream_name(lit: &LitStr, instead: &str, errors: &mut Errors) -> bool {
    let name = lit.value();
    let problem = if name.is_empty() {
        Some("a stream name can't be empty".to_owned())
    } else if name.chars().any(char::is_control) {
        Some(format!("stream name {name:?} contains a control character"))
    } else if name.chars().any(char::is_whitespace) {
        Some(format!("stream name {name:?} contains whitespace"))
    } else {
        None
    };
    match problem {
        Some(problem) => {
            errors.spanned(lit, format_args!("{problem}: {instead}"));
            false
        }
        None => true,
    }
}

/// Checks a handler's attribute and signature, and marks it usable when a handler can be
/// generated from it.
pub(crate) fn handler(handler: &mut Handler, errors: &mut Errors) {
    if let Some(lit) = &handler.stream {
        let instead = "write a name like `#[stream(\"user.created\")]`, or `#[stream]` to use the event type's stream";
        if !stream_name(lit, instead, errors) {
            handler.stream = None;
        }
    }
    let name = handler.name().clone();
    let sig = &handler.sig;
    let mut usable = true;

    if sig.asyncness.is_none() {
        // Generation goes on as if `async` were written, so this is the only error.
        errors.spanned(
            sig.fn_token,
            format_args!("a slim-bus handler must be an `async fn`: write `async fn {name}(...)`"),
        );
    }
    let qualifiers = [
        sig.constness.to_token_stream(),
        sig.unsafety.to_token_stream(),
        sig.abi.to_token_stream(),
    ];
    for qualifier in qualifiers.into_iter().filter(|tokens| !tokens.is_empty()) {
        errors.spanned(
            &qualifier,
            format_args!("a slim-bus handler is a plain `async fn`: remove `{qualifier}`"),
        );
        usable = false;
    }
    if !sig.generics.params.is_empty() {
        errors.spanned(
            &sig.generics,
            "a slim-bus handler can't be generic: name the event type it handles, like `event: UserCreated`",
        );
        usable = false;
    }

    let receiver = sig.inputs.iter().find_map(|arg| match arg {
        FnArg::Receiver(receiver) => Some(receiver),
        FnArg::Typed(_) => None,
    });
    match (handler.kind, receiver) {
        (Kind::Free, Some(receiver)) => {
            errors.spanned(
                receiver,
                "a free `#[stream]` function takes no `self`: for handler methods, put `#[slim_bus::handlers]` on the impl block and `#[stream]` on its methods",
            );
            usable = false;
        }
        (Kind::Method, None) => {
            errors.spanned(
                &name,
                format_args!(
                    "a `#[stream]` method takes `&self` first: `async fn {name}(&self, event: MyEvent)`; the service reaches its handlers as `&self`"
                ),
            );
            usable = false;
        }
        (Kind::Method, Some(receiver)) => {
            let shared_ref = receiver.reference.is_some()
                && receiver.mutability.is_none()
                && receiver.colon_token.is_none();
            if !shared_ref {
                let message = if receiver.reference.is_some() && receiver.mutability.is_some() {
                    "a `#[stream]` method takes `&self`, not `&mut self`: deliveries run concurrently on one shared service, so keep mutable state behind a `Mutex` or atomics"
                } else {
                    "a `#[stream]` method takes `&self`: the service is shared by its handlers through an `Arc`, so it can't be taken by value"
                };
                errors.spanned(receiver, message);
                usable = false;
            }
        }
        (Kind::Free, None) => {}
    }

    let args = handler.args();
    if handler.batch.is_some() {
        let example = match handler.kind {
            Kind::Free => format!("async fn {name}(batch: Vec<(UserCreated, slim_bus::Context)>)"),
            Kind::Method => {
                format!("async fn {name}(&self, batch: Vec<(UserCreated, slim_bus::Context)>)")
            }
        };
        match (args.first(), handler.batch_parts()) {
            (Some(_), Some((event, context))) if is_context(context) => {
                if let Some(problem) = event_type_problem(event) {
                    errors.spanned(event, problem);
                    usable = false;
                }
            }
            (first, _) => {
                let message = format!(
                    "a batch handler (`batch = N`) takes its entries as one argument, each event with its context: `{example}`"
                );
                match first {
                    Some(arg) => errors.spanned(&arg.ty, message),
                    None => errors.at(sig.paren_token.span.join(), message),
                }
                usable = false;
            }
        }
        for extra in args.iter().skip(1) {
            errors.spanned(
                extra,
                format_args!(
                    "a batch handler takes one argument, its entries with their contexts: remove this one, like `{example}`"
                ),
            );
            usable = false;
        }
    } else {
        let example = match handler.kind {
            Kind::Free => format!("async fn {name}(event: UserCreated)"),
            Kind::Method => format!("async fn {name}(&self, event: UserCreated)"),
        };
        match args.first() {
            None => {
                let at = sig.paren_token.span.join();
                errors.at(
                    at,
                    format_args!(
                        "`{name}` takes no event: a handler's first argument is the event it handles, like `{example}`, optionally followed by `ctx: slim_bus::Context`"
                    ),
                );
                usable = false;
            }
            Some(event) if is_context(&event.ty) => {
                let context = event.ty.to_token_stream();
                let swapped = match handler.kind {
                    Kind::Free => format!("async fn {name}(event: UserCreated, ctx: {context})"),
                    Kind::Method => {
                        format!("async fn {name}(&self, event: UserCreated, ctx: {context})")
                    }
                };
                errors.spanned(
                    &event.ty,
                    format_args!(
                        "a handler takes the event first and the context second: `{swapped}`"
                    ),
                );
                usable = false;
            }
            Some(event) => {
                if let Some(problem) = event_type_problem(&event.ty) {
                    errors.spanned(&event.ty, problem);
                    usable = false;
                }
            }
        }
        for extra in args.iter().skip(2) {
            let keep_state = match handler.kind {
                Kind::Free => "keep other state in a `#[slim_bus::handlers]` service struct",
                Kind::Method => "keep other state in fields of the service struct",
            };
            errors.spanned(
                extra,
                format_args!(
                    "a handler takes at most two arguments, the event and a `slim_bus::Context`: remove this one and {keep_state}"
                ),
            );
            usable = false;
        }
    }
    if handler.kind == Kind::Free {
        // The handler becomes a unit struct of this name, which arguments can't shadow.
        if let Some(clash) = handler.arg_idents().find(|ident| **ident == name) {
            errors.spanned(
                clash,
                format_args!(
                    "an argument can't be named like its handler `{name}` (the handler becomes a unit struct of that name): rename the argument"
                ),
            );
            usable = false;
        }
    }
    handler.usable = usable;
}

/// Whether `ty` is written as slim-bus's context (`Context`, `slim_bus::Context`), which
/// is never an event.
fn is_context(ty: &Type) -> bool {
    match ty {
        Type::Path(path) => {
            path.qself.is_none()
                && path.path.segments.last().is_some_and(|segment| {
                    segment.ident == "Context" && segment.arguments.is_none()
                })
        }
        _ => false,
    }
}

fn event_type_problem(ty: &Type) -> Option<&'static str> {
    match ty {
        Type::Reference(_) => {
            Some("a handler takes its event by value: remove the `&`, like `event: UserCreated`")
        }
        Type::ImplTrait(_) | Type::Infer(_) => {
            Some("a handler names the event type it handles, like `event: UserCreated`")
        }
        _ => None,
    }
}

pub(crate) fn service(service: &mut Service, errors: &mut Errors) {
    let item = &service.item;
    if let Some((_, trait_path, _)) = &item.trait_ {
        errors.spanned(
            trait_path,
            "`#[handlers]` goes on an inherent impl block, `impl MyService { ... }`, not on a trait impl",
        );
    }
    if !item.generics.params.is_empty() {
        errors.spanned(
            &item.generics,
            "`#[handlers]` does not support generic impl blocks: write it on an impl for a concrete type, or implement `slim_bus::StreamHandler` by hand",
        );
    }
    if item.unsafety.is_some() {
        errors.spanned(item.unsafety, "`#[handlers]` can't go on an `unsafe impl`");
    }
    if service.handlers.is_empty() {
        errors.spanned(
            &item.self_ty,
            "`#[handlers]` found no handler methods: mark each one with `#[stream(\"...\")]` or `#[stream]`",
        );
    }
    let generic = item.trait_.is_some() || !item.generics.params.is_empty();
    for handler in &mut service.handlers {
        self::handler(handler, errors);
        if generic {
            handler.usable = false;
        }
    }
    // A handler method written without `async` was reported; going on as if it were
    // written keeps that the only error.
    for impl_item in &mut service.item.items {
        if let ImplItem::Fn(method) = impl_item {
            let is_handler = service
                .handlers
                .iter()
                .any(|handler| *handler.name() == method.sig.ident);
            if is_handler && method.sig.asyncness.is_none() {
                method.sig.asyncness = Some(Default::default());
            }
            if is_handler {
                // A handler must be `async` even when it awaits nothing, so this lint is no
                // advice the user can take.
                method
                    .attrs
                    .push(syn::parse_quote!(#[allow(clippy::unused_async)]));
            }
        }
    }

    let mut first_on: HashMap<String, String> = HashMap::new();
    for handler in &service.handlers {
        let Some(lit) = &handler.stream else {
            continue;
        };
        let name = handler.name().to_string();
        match first_on.get(&lit.value()) {
            Some(first) => errors.spanned(
                lit,
                format_args!(
                    "stream {:?} is already handled by `{first}` in this impl block: a consumer group delivers each entry to one handler, so handle it in one method",
                    lit.value()
                ),
            ),
            None => {
                first_on.insert(lit.value(), name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error for `name`, if it is rejected.
    fn rejection(name: &str) -> Option<String> {
        let mut errors = Errors::default();
        let lit = LitStr::new(name, proc_macro2::Span::call_site());
        let accepted = stream_name(&lit, "instead", &mut errors);
        (!accepted).then(|| errors.to_compile_errors().to_string())
    }

    #[test]
    fn stream_names_are_checked_for_emptiness_whitespace_and_control_characters() {
        assert_eq!(rejection("user.created"), None);
        assert_eq!(rejection("{orders}:v2/eu-west"), None);
        for (name, problem) in [
            ("", "can't be empty"),
            ("user created", "whitespace"),
            ("user\tcreated", "control character"),
            ("user.created\u{7f}", "control character"),
        ] {
            let error = rejection(name).unwrap_or_default();
            assert!(error.contains(problem), "{name:?}: {error}");
        }
    }
}
