//! Checks JSON the hub returns against the schemas of its OpenAPI document: the subset of JSON
//! Schema the document uses (`$ref`, `oneOf`, `const`, `type`, `minimum`, `properties`,
//! `required`, `additionalProperties`, `items`). Tests run every response through it, so the
//! document cannot drift from what the API returns.

use serde_json::Value;

/// The OpenAPI document, and lookups into it.
#[derive(Debug, Clone)]
pub struct OpenApi {
    pub doc: Value,
}

impl OpenApi {
    pub fn new(doc: Value) -> Self {
        Self { doc }
    }

    /// The JSON schema documented for `status` of `method path` (path as written in the
    /// document, e.g. `/api/workers/{id}`), if the response is JSON.
    pub fn response_schema(&self, method: &str, path: &str, status: u16) -> Option<&Value> {
        let operation = self.doc["paths"].get(path)?.get(method.to_lowercase())?;
        let mut response = operation["responses"].get(status.to_string())?;
        if let Some(reference) = response.get("$ref").and_then(Value::as_str) {
            let name = reference.strip_prefix("#/components/responses/")?;
            response = &self.doc["components"]["responses"][name];
        }
        response["content"].get("application/json")?.get("schema")
    }

    pub fn schema(&self, name: &str) -> &Value {
        &self.doc["components"]["schemas"][name]
    }

    /// Whether `value` matches `schema`; the error names where it does not.
    pub fn check(&self, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
        if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
            let name = reference
                .strip_prefix("#/components/schemas/")
                .ok_or_else(|| format!("{at}: unsupported $ref {reference}"))?;
            let target = self.schema(name);
            if target.is_null() {
                return Err(format!("{at}: $ref to missing schema {name}"));
            }
            return self.check(target, value, at);
        }
        if let Some(options) = schema.get("oneOf").and_then(Value::as_array) {
            let matching = options
                .iter()
                .filter(|option| self.check(option, value, at).is_ok())
                .count();
            return match matching {
                1 => Ok(()),
                n => Err(format!("{at}: {value} matches {n} of the oneOf schemas")),
            };
        }
        if let Some(expected) = schema.get("const")
            && expected != value
        {
            return Err(format!("{at}: {value} is not {expected}"));
        }
        if let Some(types) = schema.get("type") {
            let types: Vec<&str> = match types {
                Value::String(one) => vec![one.as_str()],
                Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
                _ => return Err(format!("{at}: bad type in schema {schema}")),
            };
            let fits = types.iter().any(|t| match *t {
                "object" => value.is_object(),
                "array" => value.is_array(),
                "string" => value.is_string(),
                "integer" => value.is_i64() || value.is_u64(),
                "number" => value.is_number(),
                "boolean" => value.is_boolean(),
                "null" => value.is_null(),
                _ => false,
            });
            if !fits {
                return Err(format!("{at}: {value} is not of type {types:?}"));
            }
        }
        if let (Some(minimum), Some(number)) = (
            schema.get("minimum").and_then(Value::as_f64),
            value.as_f64(),
        ) && number < minimum
        {
            return Err(format!("{at}: {number} is below the minimum {minimum}"));
        }
        match value {
            Value::Object(map) => {
                let properties = schema.get("properties").and_then(Value::as_object);
                for required in schema
                    .get("required")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                {
                    if !map.contains_key(required) {
                        return Err(format!("{at}: `{required}` is missing"));
                    }
                }
                for (key, item) in map {
                    let at = format!("{at}.{key}");
                    match (
                        properties.and_then(|p| p.get(key)),
                        schema.get("additionalProperties"),
                    ) {
                        (Some(property), _) => self.check(property, item, &at)?,
                        (None, Some(Value::Bool(false))) => {
                            return Err(format!("{at}: not in the schema"));
                        }
                        (None, Some(additional)) if additional.is_object() => {
                            self.check(additional, item, &at)?;
                        }
                        (None, _) => {}
                    }
                }
            }
            Value::Array(items) => {
                if let Some(item_schema) = schema.get("items") {
                    for (i, item) in items.iter().enumerate() {
                        self.check(item_schema, item, &format!("{at}[{i}]"))?;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_checker_rejects_what_the_schema_does_not_allow() {
        let api = OpenApi::new(json!({"components": {"schemas": {
            "Thing": {"type": "object", "additionalProperties": false, "required": ["n"],
                      "properties": {"n": {"type": "integer", "minimum": 0},
                                     "tag": {"oneOf": [{"const": "a"}, {"type": "null"}]}}}
        }}}));
        let thing = json!({"$ref": "#/components/schemas/Thing"});
        assert!(api.check(&thing, &json!({"n": 1, "tag": "a"}), "$").is_ok());
        assert!(
            api.check(&thing, &json!({"n": 1, "tag": null}), "$")
                .is_ok()
        );
        for bad in [
            json!({"tag": "a"}),
            json!({"n": -1}),
            json!({"n": 1.5}),
            json!({"n": 1, "extra": true}),
            json!({"n": 1, "tag": "b"}),
            json!([1]),
        ] {
            assert!(api.check(&thing, &bad, "$").is_err(), "{bad}");
        }
    }
}
