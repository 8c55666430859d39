//! JSON merge patch (RFC 7386), strategic merge patch (the subset of Kubernetes' rules the
//! tests' objects need: lists of named objects merged by their key) and JSON patch
//! (RFC 6902: add, replace, remove, test).

use serde_json::{Map, Value};

use crate::status_err;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Merge,
    Strategic,
    Json,
}

impl Kind {
    pub fn from_content_type(ct: &str) -> Option<Kind> {
        match ct.split(';').next().unwrap_or("").trim() {
            "application/merge-patch+json" => Some(Kind::Merge),
            "application/strategic-merge-patch+json" => Some(Kind::Strategic),
            "application/json-patch+json" => Some(Kind::Json),
            _ => None,
        }
    }
}

pub fn apply(kind: Kind, target: &Value, patch: &Value) -> Result<Value, Value> {
    match kind {
        Kind::Merge => Ok(merge(target, patch, false, "")),
        Kind::Strategic => Ok(merge(target, patch, true, "")),
        Kind::Json => json_patch(target, patch),
    }
}

/// The merge key of a list field under strategic merge patch, as Kubernetes' types declare.
fn merge_key(field: &str) -> Option<&'static str> {
    match field {
        "containers"
        | "initContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "ephemeralContainers" => Some("name"),
        "volumeMounts" => Some("mountPath"),
        "ports" => Some("containerPort"),
        "tolerations" => Some("key"),
        "conditions" => Some("type"),
        _ => None,
    }
}

fn merge(target: &Value, patch: &Value, strategic: bool, field: &str) -> Value {
    match (target, patch) {
        (_, Value::Object(p)) => {
            let mut out: Map<String, Value> = target.as_object().cloned().unwrap_or_default();
            for (k, v) in p {
                if strategic && k.starts_with('$') {
                    continue;
                }
                if v.is_null() {
                    out.remove(k);
                } else {
                    let cur = out.get(k).cloned().unwrap_or(Value::Null);
                    out.insert(k.clone(), merge(&cur, v, strategic, k));
                }
            }
            Value::Object(out)
        }
        (Value::Array(t), Value::Array(p)) if strategic => {
            // Service ports merge on `port`, container ports on `containerPort`.
            let key = match merge_key(field) {
                Some("containerPort") if p.iter().all(|x| x.get("containerPort").is_none()) => {
                    Some("port")
                }
                k => k,
            };
            let Some(key) = key else {
                return patch.clone();
            };
            let mut out = t.clone();
            for item in p {
                let id = &item[key];
                if item.get("$patch").and_then(|v| v.as_str()) == Some("delete") {
                    out.retain(|x| x[key] != *id);
                    continue;
                }
                match out.iter_mut().find(|x| x[key] == *id && !id.is_null()) {
                    Some(existing) => *existing = merge(existing, item, true, ""),
                    None => out.push(merge(&Value::Null, item, true, "")),
                }
            }
            Value::Array(out)
        }
        _ => patch.clone(),
    }
}

fn pointer_parts(path: &str) -> Vec<String> {
    path.split('/')
        .skip(1)
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect()
}

fn json_patch(target: &Value, ops: &Value) -> Result<Value, Value> {
    let bad = |m: &str| status_err(422, "Invalid", m);
    let mut doc = target.clone();
    for op in ops
        .as_array()
        .ok_or_else(|| bad("a JSON patch is an array"))?
    {
        let path = op["path"].as_str().ok_or_else(|| bad("op without path"))?;
        let parts = pointer_parts(path);
        let (last, parent) = parts.split_last().ok_or_else(|| bad("empty path"))?;
        let mut node = &mut doc;
        for p in parent {
            node = match node {
                Value::Object(m) => m.get_mut(p),
                Value::Array(a) => p.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
                _ => None,
            }
            .ok_or_else(|| bad(&format!("path {path} not found")))?;
        }
        match op["op"].as_str().unwrap_or("") {
            "add" | "replace" => {
                let v = op["value"].clone();
                match node {
                    Value::Object(m) => {
                        if op["op"] == "replace" && !m.contains_key(last) {
                            return Err(bad(&format!("path {path} not found")));
                        }
                        m.insert(last.clone(), v);
                    }
                    Value::Array(a) if last == "-" => a.push(v),
                    Value::Array(a) => {
                        let i: usize = last.parse().map_err(|_| bad("bad index"))?;
                        if op["op"] == "add" && i <= a.len() {
                            a.insert(i, v);
                        } else if i < a.len() {
                            a[i] = v;
                        } else {
                            return Err(bad("index out of range"));
                        }
                    }
                    _ => return Err(bad(&format!("path {path} not found"))),
                }
            }
            "remove" => match node {
                Value::Object(m) => {
                    m.remove(last)
                        .ok_or_else(|| bad(&format!("path {path} not found")))?;
                }
                Value::Array(a) => {
                    let i: usize = last.parse().map_err(|_| bad("bad index"))?;
                    if i >= a.len() {
                        return Err(bad("index out of range"));
                    }
                    a.remove(i);
                }
                _ => return Err(bad(&format!("path {path} not found"))),
            },
            "test" => {
                let cur = match node {
                    Value::Object(m) => m.get(last).cloned(),
                    Value::Array(a) => last.parse::<usize>().ok().and_then(|i| a.get(i).cloned()),
                    _ => None,
                };
                if cur.as_ref() != Some(&op["value"]) {
                    return Err(bad(&format!("test failed at {path}")));
                }
            }
            other => return Err(bad(&format!("unsupported op {other:?}"))),
        }
    }
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_replaces_lists_and_deletes_nulls() {
        let t = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        let p = json!({"a": {"c": null, "d": 3}, "l": [3]});
        assert_eq!(
            apply(Kind::Merge, &t, &p).unwrap(),
            json!({"a": {"b": 1, "d": 3}, "l": [3]})
        );
    }

    #[test]
    fn strategic_patch_merges_containers_by_name() {
        let t = json!({"spec": {"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]}});
        let p = json!({"spec": {"containers": [{"name": "b", "image": "z"}]}});
        let r = apply(Kind::Strategic, &t, &p).unwrap();
        assert_eq!(r["spec"]["containers"][0]["image"], "x");
        assert_eq!(r["spec"]["containers"][1]["image"], "z");
        // The same patch as a merge patch replaces the list.
        let r = apply(Kind::Merge, &t, &p).unwrap();
        assert_eq!(r["spec"]["containers"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn json_patch_ops() {
        let t = json!({"metadata": {"annotations": {"a": "1"}}, "l": [1]});
        let p = json!([{"op": "add", "path": "/metadata/annotations/b~1c", "value": "2"},
                       {"op": "replace", "path": "/l/0", "value": 5},
                       {"op": "remove", "path": "/metadata/annotations/a"}]);
        let r = apply(Kind::Json, &t, &p).unwrap();
        assert_eq!(
            r,
            json!({"metadata": {"annotations": {"b/c": "2"}}, "l": [5]})
        );
        assert!(apply(Kind::Json, &t, &json!([{"op": "remove", "path": "/x"}])).is_err());
    }
}
