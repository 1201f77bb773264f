//! The AsyncAPI 3.0 document of a service: a channel per stream it handles or publishes
//! to, a `receive` operation per handler and a `send` operation per declared event type.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value, json};

use crate::bus::{EventBus, EventBusBuilder};
use crate::config::EventBusConfig;
use crate::consumer::Route;
use crate::error::{Error, Result};
use crate::event::Event;

/// The environment variable that makes [`EventBusBuilder::build`] write the service's
/// AsyncAPI document to the file it names and end the process: what
/// `slim-bus asyncapi --from-bin` sets.
///
/// Set it only for the run that should write the document: any process that builds a
/// bus with it set ends there, with exit code 0 (a [`TestBus`](crate::testing::TestBus)
/// is the exception: it never writes the document).
pub const ASYNCAPI_ENV: &str = "SLIM_BUS_ASYNCAPI";

/// How an entry carries a message, for readers of the document.
const WIRE_FORMAT: &str = "One Redis stream entry (XADD) per message, in flat fields: each top-level property of the payload is one field of the entry, its value written as text. Strings as they are; integers and floats in decimal (never an exponent); booleans as `true`/`false`; unit enum variants by their serde name; nested structs, maps, sequences, tuples and enums with data as JSON text; a `None` leaves the field out. The payload schema describes the values before this encoding. Consumers read through a consumer group and acknowledge each entry once handled; entries that keep failing move to the dead-letter stream each channel's description names, with the original fields and `@`-prefixed metadata.";

/// Each message's description: the gist of [`WIRE_FORMAT`].
const MESSAGE_FORMAT: &str = "One stream entry in flat fields: each top-level property of the payload is one field, its value as text (nested values as JSON text; a null leaves the field out). See info.description.";

/// The payload of a message whose event type has no schema: any flat fields.
fn any_fields() -> Value {
    json!({
        "type": "object",
        "description": "The entry's fields, each a text value (no schema was given for this event type).",
        "additionalProperties": { "type": "string" },
    })
}

/// What a service declares about its messages beyond its handlers: the events it
/// publishes, the payload schemas of event types, and the document's title and version.
#[derive(Debug, Clone, Default)]
pub(crate) struct Contract {
    title: Option<String>,
    version: Option<String>,
    /// Event types with a payload schema.
    schemas: Vec<Described>,
    /// Event types the service publishes.
    publishes: Vec<Published>,
}

#[derive(Debug, Clone)]
struct Described {
    type_name: &'static str,
    stream: Option<&'static str>,
    payload: Value,
    /// Schemas the payload refers to, under `#/components/schemas/`.
    definitions: Map<String, Value>,
}

#[derive(Debug, Clone)]
struct Published {
    type_name: &'static str,
    stream: Option<&'static str>,
    /// [`Event::PARTITIONS`].
    partitions: Option<u32>,
}

impl Contract {
    /// Rejects a published event type that names no stream.
    pub(crate) fn validate(&self) -> Result<()> {
        match self.publishes.iter().find(|p| p.stream.is_none()) {
            Some(published) => Err(Error::NoEventStream {
                event: published.type_name,
            }),
            None => Ok(()),
        }
    }

    /// The partitioned streams of the event types the service declares it publishes: each
    /// stream, its partition count and the event type.
    pub(crate) fn published_partitions(&self) -> impl Iterator<Item = (&str, u32, &str)> {
        self.publishes.iter().filter_map(|published| {
            Some((
                published.stream?,
                published.partitions?,
                published.type_name,
            ))
        })
    }

    fn described(&self, type_name: &str) -> Option<&Described> {
        self.schemas.iter().find(|d| d.type_name == type_name)
    }
}

impl EventBusBuilder {
    /// The title and version of the service in its [AsyncAPI document](EventBus::asyncapi);
    /// by default the consumer group (else `slim-bus service`) and `0.0.0`.
    pub fn asyncapi_info(mut self, title: impl Into<String>, version: impl Into<String>) -> Self {
        self.contract.title = Some(title.into());
        self.contract.version = Some(version.into());
        self
    }

    /// Declares that the service publishes `E` to its stream: a `send` operation in the
    /// [AsyncAPI document](EventBus::asyncapi). Its payload is the schema given with
    /// `event_schema` (feature `schemars`), else any flat fields.
    /// [`build`](Self::build) fails with [`Error::NoEventStream`] when `E` names no stream.
    ///
    /// When `E` declares partitions (`#[event(partitions = N)]`), the bus knows its stream
    /// as partitioned from then on: [`publish_to`](EventBus::publish_to) and
    /// [`send`](EventBus::send) with the logical name route to a partition, and `build`
    /// fails when another setting gives the stream another count.
    pub fn publishes<E: Event>(mut self) -> Self {
        self.contract.publishes.push(Published {
            type_name: std::any::type_name::<E>(),
            stream: E::STREAM,
            partitions: E::PARTITIONS,
        });
        self
    }

    /// Gives the payload schema of `E`, from its `schemars::JsonSchema` derive, to the
    /// [AsyncAPI document](EventBus::asyncapi): used for the messages of `E` published
    /// ([`publishes`](Self::publishes)) and for the handler on `E`'s stream.
    #[cfg(feature = "schemars")]
    pub fn event_schema<E: Event + schemars::JsonSchema>(mut self) -> Self {
        let type_name = std::any::type_name::<E>();
        if self.contract.described(type_name).is_none() {
            let (payload, definitions) = payload_schema::<E>();
            self.contract.schemas.push(Described {
                type_name,
                stream: E::STREAM,
                payload,
                definitions,
            });
        }
        self
    }

    /// [`publishes`](Self::publishes) and [`event_schema`](Self::event_schema) of `E` in
    /// one call.
    #[cfg(feature = "schemars")]
    pub fn publishes_with_schema<E: Event + schemars::JsonSchema>(self) -> Self {
        self.event_schema::<E>().publishes::<E>()
    }
}

/// The JSON Schema (draft 7, as AsyncAPI 3.0 takes it) of `E`, and the schemas it refers
/// to, which the document keeps under `#/components/schemas/`.
#[cfg(feature = "schemars")]
fn payload_schema<E: schemars::JsonSchema>() -> (Value, Map<String, Value>) {
    let generator = schemars::generate::SchemaSettings::draft07()
        .with(|settings| {
            settings.definitions_path = "/components/schemas".into();
            settings.meta_schema = None;
        })
        .into_generator();
    let mut payload = generator.into_root_schema_for::<E>().to_value();
    let definitions = payload
        .as_object_mut()
        .and_then(|object| object.remove("components"))
        .and_then(|mut components| components.get_mut("schemas").map(Value::take))
        .and_then(|schemas| match schemas {
            Value::Object(schemas) => Some(schemas),
            _ => None,
        })
        .unwrap_or_default();
    (payload, definitions)
}

impl EventBus {
    /// The service's [AsyncAPI 3.0](https://www.asyncapi.com/docs/reference/specification/v3.0.0)
    /// document, as JSON: one channel per stream the bus handles or publishes to (its
    /// address is the stream's name), a `receive` operation per registered handler, and
    /// a `send` operation per event type declared with
    /// [`publishes`](EventBusBuilder::publishes). Message payloads are the JSON Schemas
    /// given with `EventBusBuilder::event_schema` (feature `schemars`),
    /// else any flat fields; `info.description` and each message's description say how
    /// the payload travels as flat stream fields.
    ///
    /// A service can also write it without code of its own: with the environment variable
    /// [`SLIM_BUS_ASYNCAPI`](ASYNCAPI_ENV) set to a path,
    /// [`build`](EventBusBuilder::build) writes the document there and ends the process
    /// (exit code 0) before connecting to anything. `slim-bus asyncapi --from-bin PATH`
    /// runs a service that way.
    ///
    /// # Examples
    ///
    /// ```
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Debug, Serialize, Deserialize, slim_bus::Event)]
    /// # #[event(stream = "user.created")]
    /// # struct UserCreated { user_id: String }
    /// # #[slim_bus::stream]
    /// # async fn send_welcome_mail(event: UserCreated) {}
    /// # async fn run() -> slim_bus::Result<()> {
    /// let bus = slim_bus::EventBus::builder()
    ///     .url("memory://")
    ///     .consumer_group("mailer")
    ///     .handler(send_welcome_mail)
    ///     .asyncapi_info("mailer", "1.4.0")
    ///     .build()
    ///     .await?;
    /// let document = bus.asyncapi();
    /// assert_eq!(document["channels"]["user.created"]["address"], "user.created");
    /// assert_eq!(document["operations"]["receive.user.created"]["action"], "receive");
    /// # Ok(())
    /// # }
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(run()).unwrap();
    /// ```
    pub fn asyncapi(&self) -> Value {
        document(self.routes(), self.config(), self.contract())
    }
}

/// Writes the document to the file [`ASYNCAPI_ENV`] names and ends the process, when it
/// is set; returns otherwise.
pub(crate) fn write_if_asked(routes: &[Route], config: &EventBusConfig, contract: &Contract) {
    let Some(path) = std::env::var_os(ASYNCAPI_ENV) else {
        return;
    };
    let text = match serde_json::to_string_pretty(&document(routes, config, contract)) {
        Ok(text) => text,
        Err(error) => exit_with(
            1,
            &format!("cannot serialize the AsyncAPI document: {error}"),
        ),
    };
    if let Err(error) = std::fs::write(Path::new(&path), text + "\n") {
        exit_with(
            1,
            &format!(
                "cannot write the AsyncAPI document to {} ({ASYNCAPI_ENV}): {error}",
                Path::new(&path).display()
            ),
        );
    }
    std::process::exit(0);
}

fn exit_with(code: i32, message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(code)
}

/// A key the document can use for `name` (component and channel keys are `[\w.-]+`).
fn key(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `UserCreated` for `my_service::events::UserCreated`, keeping generic arguments short.
fn short_name(type_name: &str) -> String {
    let mut short = String::new();
    let mut segment = String::new();
    for c in type_name.chars() {
        match c {
            ':' => segment.clear(),
            '<' | '>' | ',' | ' ' => {
                short.push_str(&segment);
                segment.clear();
                short.push(c);
            }
            _ => segment.push(c),
        }
    }
    short.push_str(&segment);
    short
}

fn message(name: &str, type_name: Option<&str>, payload: Value) -> Value {
    let mut message = json!({
        "name": name,
        "title": name,
        "description": MESSAGE_FORMAT,
        "payload": payload,
        "x-slim-bus-encoding": "flat-fields",
    });
    if let Some(type_name) = type_name {
        message["x-slim-bus-rust-type"] = Value::from(type_name);
    }
    message
}

/// One channel as it is filled: its messages by key, and the partition count when its
/// stream is partitioned.
#[derive(Default)]
struct Channel {
    messages: BTreeMap<String, Value>,
    partitions: Option<u32>,
}

/// The logical stream a route reads: its partition's stream without the `:{k}` suffix.
fn logical_stream(route: &Route) -> &str {
    route
        .partition
        .and_then(|partition| route.stream.strip_suffix(&format!(":{{{partition}}}")))
        .unwrap_or(&route.stream)
}

/// The channel's address: a partitioned stream's has the parameter `{partition}` where
/// its streams have their hash tag, so `orders:{partition}` with `partition` = `{0}` is
/// the stream `orders:{0}`.
fn address(stream: &str, partitions: Option<u32>) -> String {
    match partitions {
        Some(_) => format!("{stream}:{{partition}}"),
        None => stream.to_owned(),
    }
}

pub(crate) fn document(routes: &[Route], config: &EventBusConfig, contract: &Contract) -> Value {
    let mut channels: BTreeMap<String, Channel> = BTreeMap::new();
    let mut operations = Map::new();
    let mut schemas = Map::new();
    let group = config.consumer_group.as_deref().unwrap_or("-");

    for route in routes {
        let stream = logical_stream(route);
        let channel = channels.entry(stream.to_owned()).or_default();
        if let Some(partition) = route.partition {
            let seen = channel.partitions.unwrap_or(0).max(partition + 1);
            channel.partitions = Some(
                config
                    .stream_partitions
                    .get(stream)
                    .copied()
                    .unwrap_or(seen),
            );
        }
        let dead_letters = match route.partition {
            Some(_) => crate::dead_letter::dead_letter_stream(
                &address(stream, Some(0)),
                &config.dead_letter_suffix,
            ),
            None => route.dead_letters.to_string(),
        };
        let described: Vec<&Described> = contract
            .schemas
            .iter()
            .filter(|d| d.stream == Some(stream))
            .collect();
        let mut refs = Vec::new();
        if described.is_empty() {
            let message_key = key(stream);
            channel
                .messages
                .insert(message_key.clone(), message(stream, None, any_fields()));
            refs.push(message_key);
        }
        for described in described {
            let (message_key, message) = use_described(described, &mut schemas);
            channel.messages.insert(message_key.clone(), message);
            refs.push(message_key);
        }
        operations.insert(
            format!("receive.{}", key(stream)),
            json!({
                "action": "receive",
                "channel": { "$ref": format!("#/channels/{}", key(stream)) },
                "summary": format!("Handled through consumer group `{group}`"),
                "description": format!(
                    "Each entry is handled once per consumer group and acknowledged when the handler succeeds; it is retried with backoff, and after {} deliveries (or a permanent error, or an entry that does not decode) moved to `{}`.",
                    route.max_deliveries, dead_letters
                ),
                "messages": message_refs(stream, &refs),
            }),
        );
    }

    for published in &contract.publishes {
        let Some(stream) = published.stream else {
            continue;
        };
        let channel = channels.entry(stream.to_owned()).or_default();
        let partitions = config
            .stream_partitions
            .get(stream)
            .copied()
            .or(published.partitions);
        channel.partitions = channel.partitions.or(partitions);
        let name = short_name(published.type_name);
        let (message_key, message) = match contract.described(published.type_name) {
            Some(described) => use_described(described, &mut schemas),
            None => (
                key(&name),
                message(&name, Some(published.type_name), any_fields()),
            ),
        };
        channel.messages.insert(message_key.clone(), message);
        operations.insert(
            format!("send.{}.{message_key}", key(stream)),
            json!({
                "action": "send",
                "channel": { "$ref": format!("#/channels/{}", key(stream)) },
                "summary": format!("Publishes {name}"),
                "messages": message_refs(stream, &[message_key]),
            }),
        );
    }

    let channels: Map<String, Value> = channels
        .into_iter()
        .map(|(stream, channel)| {
            let address = address(&stream, channel.partitions);
            let dead_letters =
                crate::dead_letter::dead_letter_stream(&address, &config.dead_letter_suffix);
            let mut value = json!({
                "address": address,
                "title": stream,
                "messages": channel.messages,
            });
            match channel.partitions {
                Some(partitions) => {
                    value["description"] = format!(
                        "The partitioned stream `{stream}`: {partitions} Redis streams `{address}`, each with its dead letters in `{dead_letters}`. An event goes to the partition of its key (CRC-32 of the key field's stored value, mod {partitions}) or, without a key, to each partition in turn."
                    )
                    .into();
                    value["parameters"] = json!({
                        "partition": {
                            "description": "The partition: its number in braces, the hash tag of its Redis stream's name.",
                            "enum": (0..partitions).map(|k| format!("{{{k}}}")).collect::<Vec<_>>(),
                        }
                    });
                }
                None => {
                    value["description"] = format!(
                        "The Redis stream `{stream}`; its dead letters are in `{dead_letters}`."
                    )
                    .into();
                }
            }
            (key(&stream), value)
        })
        .collect();
    let title = contract
        .title
        .clone()
        .or_else(|| config.consumer_group.clone())
        .unwrap_or_else(|| "slim-bus service".to_owned());
    let mut document = json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": title,
            "version": contract.version.clone().unwrap_or_else(|| "0.0.0".to_owned()),
            "description": WIRE_FORMAT,
        },
        "channels": channels,
        "operations": operations,
    });
    if !schemas.is_empty() {
        document["components"] = json!({ "schemas": schemas });
    }
    document
}

/// The key and message of a described event type; its schemas join `schemas`.
fn use_described(described: &Described, schemas: &mut Map<String, Value>) -> (String, Value) {
    schemas.extend(described.definitions.clone());
    let name = short_name(described.type_name);
    (
        key(&name),
        message(&name, Some(described.type_name), described.payload.clone()),
    )
}

fn message_refs(stream: &str, keys: &[String]) -> Vec<Value> {
    keys.iter()
        .map(|message| json!({ "$ref": format!("#/channels/{}/messages/{message}", key(stream)) }))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_are_shortened_and_keys_are_safe() {
        assert_eq!(short_name("svc::events::UserCreated"), "UserCreated");
        assert_eq!(
            short_name("std::collections::HashMap<alloc::string::String, alloc::string::String>"),
            "HashMap<String, String>"
        );
        assert_eq!(key("HashMap<String, String>"), "HashMap_String__String_");
        assert_eq!(key("{orders}:dlq"), "_orders__dlq");
        assert_eq!(key("user.created"), "user.created");
    }
}
