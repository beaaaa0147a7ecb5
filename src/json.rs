//! Reading JSON documents (events, key policies): what kind of value was found, for messages that say
//! what was expected instead.

use serde_json::Value;

/// `null`, `boolean`, `number`, `string`, `array` or `object`.
pub(crate) fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}
