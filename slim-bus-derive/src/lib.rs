//! Macros for slim-bus; use them through the `slim-bus` crate, which documents them:
//! `#[derive(slim_bus::Event)]`, `#[slim_bus::stream]` and `#[slim_bus::handlers]`.
//!
//! Each macro is a pipeline: `attr` parses attributes, `ast` builds the typed model,
//! `valid` checks it with spanned errors, and `expand` generates code with `quote!` only.

mod ast;
mod attr;
mod ctxt;
mod expand;
mod valid;

use proc_macro::TokenStream;
use syn::{DeriveInput, ItemFn, ItemImpl, parse_macro_input};

use crate::ctxt::Errors;

/// Defined in `slim-bus-derive`; use it through `slim_bus`, which re-exports and documents it.
#[proc_macro_derive(Event, attributes(event))]
pub fn derive_event(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    let mut errors = Errors::default();
    let mut event = ast::Event::from_syn(&input, &mut errors);
    valid::event(&mut event, &mut errors);
    expand::event(&event, &errors).into()
}

/// Defined in `slim-bus-derive`; use it through `slim_bus`, which re-exports and documents it.
#[proc_macro_attribute]
pub fn stream(args: TokenStream, item: TokenStream) -> TokenStream {
    let Ok(item_fn) = syn::parse::<ItemFn>(item.clone()) else {
        return not_on(
            item,
            "`#[stream]` goes on an `async fn` that takes the event, or on handler methods inside a `#[slim_bus::handlers]` impl block",
        );
    };
    let mut errors = Errors::default();
    let mut free = ast::FreeHandler::from_syn(args.into(), item_fn, &mut errors);
    valid::handler(&mut free.handler, &mut errors);
    expand::free_handler(&free, &errors).into()
}

/// Defined in `slim-bus-derive`; use it through `slim_bus`, which re-exports and documents it.
#[proc_macro_attribute]
pub fn handlers(args: TokenStream, item: TokenStream) -> TokenStream {
    let Ok(item_impl) = syn::parse::<ItemImpl>(item.clone()) else {
        return not_on(
            item,
            "`#[handlers]` goes on an impl block of a service struct: `#[slim_bus::handlers] impl MyService { ... }`",
        );
    };
    let mut errors = Errors::default();
    let mut service = ast::Service::from_syn(args.into(), item_impl, &mut errors);
    valid::service(&mut service, &mut errors);
    expand::service(&service, &errors).into()
}

/// The item unchanged, with an error on the attribute.
fn not_on(item: TokenStream, message: &str) -> TokenStream {
    let mut errors = Errors::default();
    errors.at(proc_macro2::Span::call_site(), message);
    let mut out: TokenStream = errors.to_compile_errors().into();
    out.extend(item);
    out
}
