//! Code generation from the validated model: `quote!` only, no checks.
//!
//! Generated code names the runtime through `#krate::__private` (`::slim_bus` unless
//! `crate = "..."` says otherwise) and std through `::core` / `::std`, so it needs no
//! imports. Tokens that can fail to type-check carry the span of the user's code they
//! stand for, so errors land there rather than on the attribute.

use proc_macro2::{Group, Span, TokenStream, TokenTree};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Attribute, Ident, ImplItem, LitStr, Pat, PatIdent, Path, ReturnType, Type};

use crate::ast::{Event, FreeHandler, Handler, Service, type_text};
use crate::ctxt::Errors;

pub(crate) fn event(event: &Event<'_>, errors: &Errors) -> TokenStream {
    let Event {
        ident,
        generics,
        stream,
        max_len,
        partitions,
        key_wire_name,
        krate,
        ..
    } = event;
    let (impl_generics, ty_generics, where_clause) = generics.split_for_impl();
    let stream = optional_str(stream.as_ref());
    // Left to the trait's default (`None`) when not set, so that the expansion of events
    // without it stays as it was.
    let max_len = max_len.as_ref().map(|lit| {
        quote! { const MAX_LEN: ::core::option::Option<usize> = ::core::option::Option::Some(#lit); }
    });
    let partitions = partitions.as_ref().map(|lit| {
        // Without a suffix the literal written (`8`, `8_u32`, ...) types as the `u32` here.
        let lit = syn::LitInt::new(lit.base10_digits(), lit.span());
        quote! { const PARTITIONS: ::core::option::Option<u32> = ::core::option::Option::Some(#lit); }
    });
    let key = key_wire_name.as_ref().map(|name| {
        quote! { const PARTITION_KEY: ::core::option::Option<&'static str> = ::core::option::Option::Some(#name); }
    });
    // A generic event is an event for those arguments that make it (de)serializable.
    let where_clause = if generics.params.is_empty() {
        // A concrete one states the serde bounds higher-ranked, which rustc does not check
        // at the impl: a type without serde's derives then gets the errors of the checks
        // below, which name the fix, instead of errors about `Event`'s supertraits, which
        // rustc calls "sealed" (they come from serde_core, which users cannot name).
        quote! {
            where
                for<'__de> #ident: #krate::__private::serde::Serialize
                    + #krate::__private::serde::Deserialize<'__de>,
        }
    } else {
        let predicates = where_clause.map(|clause| &clause.predicates);
        quote! {
            where
                #ident #ty_generics: #krate::__private::serde::Serialize
                    + #krate::__private::serde::de::DeserializeOwned
                    + ::core::marker::Send
                    + ::core::marker::Sync
                    + 'static,
                #predicates
        }
    };
    let serde_checks = generics.params.is_empty().then(|| {
        quote_spanned! {ident.span()=>
            const _: () = {
                #krate::__private::event_derives_serialize::<#ident>();
                #krate::__private::event_derives_deserialize::<#ident>();
            };
        }
    });
    let errors = errors.to_compile_errors();
    quote! {
        #errors
        #serde_checks
        #[automatically_derived]
        impl #impl_generics #krate::__private::Event for #ident #ty_generics #where_clause {
            const STREAM: ::core::option::Option<&'static str> = #stream;
            #max_len
            #partitions
            #key
        }
    }
}

pub(crate) fn free_handler(free: &FreeHandler, errors: &Errors) -> TokenStream {
    let FreeHandler {
        item,
        handler,
        krate,
    } = free;
    let name = handler.name();
    let vis = &item.vis;
    let cfgs: Vec<&Attribute> = item
        .attrs
        .iter()
        .filter(|attr| attr.path().is_ident("cfg"))
        .collect();
    let docs: Vec<&Attribute> = item
        .attrs
        .iter()
        .filter(|attr| attr.path().is_ident("doc"))
        .collect();
    let others = item
        .attrs
        .iter()
        .filter(|attr| !attr.path().is_ident("cfg") && !attr.path().is_ident("doc"));
    let separator = (!docs.is_empty()).then(|| quote!(#[doc = ""]));
    let errors = errors.to_compile_errors();
    if handler.receiver().is_some() {
        // A method in a plain impl block: leave it as it is, where a struct can't go.
        return quote!(#errors #item);
    }
    // `call` takes the arguments under the names the function gives them, so that its
    // docs read as the function does; patterns get a name that clashes with nothing.
    let arg_names: Vec<Ident> = handler
        .args()
        .iter()
        .zip(if handler.batch.is_some() {
            ["__batch", "__ctx"]
        } else {
            ["__event", "__ctx"]
        })
        .map(|(arg, fallback)| plain_name(&arg.pat).unwrap_or_else(|| format_ident!("{fallback}")))
        .collect();
    let call_example = arg_names
        .iter()
        .map(Ident::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let register = if handler.batch.is_some() {
        "batch_handler"
    } else {
        "handler"
    };
    let about = format!(
        " A slim-bus handler made by `#[slim_bus::stream]`: register it with \
         `EventBusBuilder::{register}({name})`, and call the function as written with \
         `{name}::call({call_example}).await`."
    );
    let unit = quote! {
        #errors
        #(#cfgs)*
        #(#docs)*
        #separator
        #[doc = #about]
        #[allow(non_camel_case_types)]
        #[derive(
            ::core::clone::Clone,
            ::core::marker::Copy,
            ::core::fmt::Debug,
            ::core::default::Default,
        )]
        #vis struct #name;
    };
    if !handler.usable {
        return unit;
    }
    let Some(event_ty) = handler.event_ty() else {
        return unit;
    };

    // The body keeps the signature as written, under the handler's own name, so that
    // compiler messages about its future name it.
    let mut body_sig = handler.sig.clone();
    body_sig.asyncness = Some(Default::default());
    let body = &item.block;
    let output = &handler.sig.output;
    let arg_types = [Some(event_ty), handler.context_ty()].into_iter().flatten();
    let call_params = quote!(#(#arg_names: #arg_types),*);
    let call_args = quote!(#(#arg_names),*);
    let call_doc = format!(
        " Runs the handler function `{name}` as written, outside any bus: for tests, or to \
         reuse it from other code."
    );
    let target = quote!(Self::#name);
    let handler_impl = handler_impl(krate, name, handler, event_ty, &target, None);
    let assertion = stream_assertion(krate, handler, name);
    quote! {
        #unit

        #(#cfgs)*
        impl #name {
            #[doc = #call_doc]
            #vis async fn call(#call_params) #output {
                Self::#name(#call_args).await
            }

            // A handler must be `async` even when it awaits nothing, so this lint is no
            // advice the user can take.
            #[doc(hidden)]
            #[allow(clippy::unused_async)]
            #(#others)*
            #body_sig #body
        }

        #(#cfgs)*
        #handler_impl

        #(#cfgs)*
        #assertion
    }
}

pub(crate) fn service(service: &Service, errors: &Errors) -> TokenStream {
    let Service {
        item,
        handlers,
        krate,
    } = service;
    let errors = errors.to_compile_errors();
    if item.trait_.is_some() || !item.generics.params.is_empty() {
        return quote!(#errors #item);
    }
    let self_ty = service.self_ty();
    let cfgs: Vec<&Attribute> = item
        .attrs
        .iter()
        .filter(|attr| attr.path().is_ident("cfg"))
        .collect();
    let usable: Vec<&Handler> = handlers.iter().filter(|handler| handler.usable).collect();
    let mut registrations = Vec::new();
    let mut assertions = Vec::new();
    for handler in &usable {
        let Some(event_ty) = handler.event_ty() else {
            continue;
        };
        let name = handler.name();
        let method_cfgs = method_cfgs(item, name);
        let target = quote!(<#self_ty>::#name);
        let handler_impl = handler_impl(krate, name, handler, event_ty, &target, Some(self_ty));
        let assertion = stream_assertion(krate, handler, name);
        let register = if handler.batch.is_some() {
            format_ident!("batch_handler")
        } else {
            format_ident!("handler")
        };
        // Each item under the method's `cfg`s: the handler exists only where it does.
        let method_cfgs = quote!(#(#method_cfgs)*);
        registrations.push(quote! {
            #method_cfgs
            #[allow(non_camel_case_types)]
            struct #name(::std::sync::Arc<#self_ty>);
            #method_cfgs
            #handler_impl
            #method_cfgs
            #assertion
            #method_cfgs
            __handlers.#register(#name(::std::sync::Arc::clone(&self)));
        });
    }
    for (i, first) in usable.iter().enumerate() {
        for second in &usable[i + 1..] {
            let conditional = [first.name(), second.name()]
                .into_iter()
                .any(|name| !method_cfgs(item, name).is_empty());
            if !conditional {
                assertions.push(same_stream_assertion(krate, first, second));
            }
        }
    }
    let impl_cfgs = quote!(#(#cfgs)*);
    quote! {
        #errors
        #item

        #impl_cfgs
        impl #krate::__private::StreamService for #self_ty {
            fn register(
                self: ::std::sync::Arc<Self>,
                __handlers: &mut #krate::__private::Handlers,
            ) {
                #(#registrations)*
                #(#assertions)*
                let _ = (self, __handlers);
            }
        }
    }
}

/// The `cfg` attributes of the method `name` of `item`: its registration and checks exist
/// only where it does.
fn method_cfgs<'a>(item: &'a syn::ItemImpl, name: &Ident) -> Vec<&'a Attribute> {
    item.items
        .iter()
        .filter_map(|impl_item| match impl_item {
            ImplItem::Fn(method) if method.sig.ident == *name => Some(&method.attrs),
            _ => None,
        })
        .flatten()
        .filter(|attr| attr.path().is_ident("cfg"))
        .collect()
}

/// The handler's impl: `BatchHandler` for `batch = N`, else `StreamHandler`.
fn handler_impl(
    krate: &Path,
    name: &Ident,
    handler: &Handler,
    event_ty: &Type,
    target: &TokenStream,
    service: Option<&Type>,
) -> TokenStream {
    match (&handler.batch, handler.batch_parts()) {
        (Some(max_batch), Some((event_ty, _))) => {
            batch_handler_impl(krate, name, handler, max_batch, event_ty, target, service)
        }
        _ => stream_handler_impl(krate, name, handler, event_ty, target, service),
    }
}

/// `impl BatchHandler for #name`, calling `#target` with the whole batch.
fn batch_handler_impl(
    krate: &Path,
    name: &Ident,
    handler: &Handler,
    max_batch: &syn::LitInt,
    event_ty: &Type,
    target: &TokenStream,
    service: Option<&Type>,
) -> TokenStream {
    let receiver = service.map(|_| quote!(&self.0,));
    let future = respan(
        quote! {
            let __future = #krate::__private::handler_future_must_be_send(
                #target(#receiver __batch)
            );
        },
        name.span(),
    );
    let outcome = match &handler.sig.output {
        ReturnType::Type(_, ty) => respan(
            quote!(<#ty as #krate::__private::IntoBatchOutcome>::into_batch_outcome(__output)),
            ty.span(),
        ),
        ReturnType::Default => quote!(#krate::__private::into_batch_outcome(__output)),
    };
    // Checked by parsing (0 is reported there); as a `usize` whatever suffix was written.
    let max_batch: usize = max_batch.base10_parse::<usize>().unwrap_or(1).max(1);
    let settings = handler_settings(handler);
    let event_assoc = quote_spanned! {event_ty.span()=>
        type Event = #event_ty;
    };
    quote! {
        #[#krate::__private::async_trait]
        impl #krate::__private::BatchHandler for #name {
            #event_assoc

            fn max_batch(&self) -> usize {
                #max_batch
            }

            async fn handle_batch(
                &self,
                __batch: ::std::vec::Vec<(#event_ty, #krate::__private::Context)>,
            ) -> #krate::__private::BatchOutcome {
                #future
                let __output = __future.await;
                #outcome
            }

            #settings
        }
    }
}

/// The `stream`, `max_deliveries` and `handler_timeout` methods the attribute sets.
fn handler_settings(handler: &Handler) -> TokenStream {
    let stream = handler.stream.as_ref().map(|lit| {
        quote! {
            fn stream(&self) -> ::core::option::Option<&str> {
                ::core::option::Option::Some(#lit)
            }
        }
    });
    let max_deliveries = handler.max_deliveries.as_ref().and_then(|lit| {
        // Checked by parsing; as a `u64` whatever suffix was written.
        let max: u64 = lit.base10_parse().ok()?;
        Some(quote! {
            fn max_deliveries(&self) -> ::core::option::Option<u64> {
                ::core::option::Option::Some(#max)
            }
        })
    });
    let timeout = handler.timeout.as_ref().map(|(_, duration)| {
        let (secs, nanos) = (duration.as_secs(), duration.subsec_nanos());
        quote! {
            fn handler_timeout(&self) -> ::core::option::Option<::core::time::Duration> {
                ::core::option::Option::Some(::core::time::Duration::new(#secs, #nanos))
            }
        }
    });
    quote!(#stream #max_deliveries #timeout)
}

/// `impl StreamHandler for #name`, calling `#target` (the body function, or the method on
/// the service held in `self.0`).
fn stream_handler_impl(
    krate: &Path,
    name: &Ident,
    handler: &Handler,
    event_ty: &Type,
    target: &TokenStream,
    service: Option<&Type>,
) -> TokenStream {
    let receiver = service.map(|_| quote!(&self.0,));
    let context = handler.context_ty().map(|ty| {
        quote_spanned! {ty.span()=>
            <#ty as #krate::__private::HandlerContext>::from_context(__ctx)
        }
    });
    let context_param = match context {
        Some(_) => quote!(__ctx),
        None => quote!(_),
    };
    // All of the call spanned on the handler's name, so that "future returned by `name`
    // is not `Send`" lands there; the conversion of the output on the return type.
    let future = respan(
        quote! {
            let __future = #krate::__private::handler_future_must_be_send(
                #target(#receiver __event, #context)
            );
        },
        name.span(),
    );
    let outcome = match &handler.sig.output {
        ReturnType::Type(_, ty) => respan(
            quote!(<#ty as #krate::__private::IntoHandlerResult>::into_handler_result(__output)),
            ty.span(),
        ),
        ReturnType::Default => quote!(#krate::__private::into_handler_result(__output)),
    };
    let outcome = quote! {
        #future
        let __output = __future.await;
        #outcome
    };
    let settings = handler_settings(handler);
    // Spanned on the event type: "`X` is not an event" and privacy errors land there.
    let event_assoc = quote_spanned! {event_ty.span()=>
        type Event = #event_ty;
    };
    quote! {
        #[#krate::__private::async_trait]
        impl #krate::__private::StreamHandler for #name {
            #event_assoc

            async fn handle(
                &self,
                __event: #event_ty,
                __ctx: #krate::__private::Context,
            ) -> ::core::result::Result<(), #krate::__private::HandlerError> {
                <Self as #krate::__private::StreamHandler>::handle_and_emit(self, __event, __ctx)
                    .await
                    .map(::core::mem::drop)
            }

            fn handle_and_emit(
                &self,
                __event: #event_ty,
                #context_param: #krate::__private::Context,
            ) -> #krate::__private::HandlerCall<'_> {
                #krate::__private::HandlerCall::new(async move { #outcome })
            }

            #settings
        }
    }
}

/// For a handler whose attribute names no stream: a compile error unless its event type
/// names one. The event type is reached through the handler's impl, so an event type
/// that is not an `Event` is reported there alone.
fn stream_assertion(krate: &Path, handler: &Handler, handler_ty: &Ident) -> TokenStream {
    if handler.names_stream {
        return TokenStream::new();
    }
    let event_ty = handler
        .batch_parts()
        .filter(|_| handler.batch.is_some())
        .map(|(event, _)| event)
        .or(handler.event_ty())
        .map(type_text)
        .unwrap_or_default();
    let message = format!(
        "`{name}` has no stream: `#[stream]` names none and neither does its event type `{event_ty}`; \
         name one with `#[stream(\"...\")]`, or give the event type one with \
         `#[event(stream = \"...\")]`",
        name = handler.name(),
    );
    let check = if handler.batch.is_some() {
        format_ident!("batch_handler_needs_a_stream")
    } else {
        format_ident!("handler_needs_a_stream")
    };
    // All of it at the attribute, which the evaluation error then points at.
    respan(
        quote! {
            const _: () = #krate::__private::#check::<#handler_ty>(#message);
        },
        handler.attr_span,
    )
}

/// For two handlers of one service of which at least one takes its event type's stream:
/// a compile error when they end up on the same stream.
fn same_stream_assertion(krate: &Path, first: &Handler, second: &Handler) -> TokenStream {
    let invalid = |handler: &Handler| handler.names_stream && handler.stream.is_none();
    // A batch handler is not a `StreamHandler`: `build()` rejects a clash with one.
    let batch = first.batch.is_some() || second.batch.is_some();
    if (first.names_stream && second.names_stream) || invalid(first) || invalid(second) || batch {
        // Literals are compared by `valid`; an invalid one is reported already.
        return TokenStream::new();
    }
    let (a, b) = (
        optional_str(first.stream.as_ref()),
        optional_str(second.stream.as_ref()),
    );
    let (first_ty, second_ty) = (first.name(), second.name());
    let message = format!(
        "`{first_ty}` and `{second_ty}` handle the same stream: a consumer group delivers each \
         entry to one handler, so handle it in one method, or name another stream with \
         `#[stream(\"...\")]`",
    );
    respan(
        quote! {
            const _: () =
                #krate::__private::distinct_streams::<#first_ty, #second_ty>(#a, #b, #message);
        },
        second.attr_span,
    )
}

fn optional_str(lit: Option<&LitStr>) -> TokenStream {
    match lit {
        Some(lit) => quote!(::core::option::Option::Some(#lit)),
        None => quote!(::core::option::Option::None),
    }
}

/// The name an argument pattern binds, when it is a plain name (`event`, `mut event`).
fn plain_name(pat: &Pat) -> Option<Ident> {
    match pat {
        Pat::Ident(PatIdent {
            ident,
            by_ref: None,
            subpat: None,
            ..
        }) if ident != "self" => Some(ident.clone()),
        _ => None,
    }
}

/// `tokens` with every token at `span`, so that an error about any part of them, or
/// about the whole, points there.
fn respan(tokens: TokenStream, span: Span) -> TokenStream {
    tokens
        .into_iter()
        .map(|mut token| {
            if let TokenTree::Group(group) = &token {
                let mut inner = Group::new(group.delimiter(), respan(group.stream(), span));
                inner.set_span(span);
                token = TokenTree::Group(inner);
            } else {
                token.set_span(span);
            }
            token
        })
        .collect()
}
