//! Decodes the Kubernetes protobuf encoding (`application/vnd.kubernetes.protobuf`) of the
//! objects kubectl's typed clients send (`kubectl create deployment` posts a protobuf
//! Deployment and does not fall back to JSON), into the same JSON the API serves.
//!
//! Only the fields of the schema below are read (field numbers from the Kubernetes
//! `generated.proto` files); others are skipped. Empty strings, messages and maps are
//! dropped, as Go's `omitempty` would.

use serde_json::{json, Map, Value};

#[derive(Clone, Copy)]
enum T {
    Str,
    Int,
    Bool,
    Msg(&'static str),
    /// map<string, string>
    MapStr,
    /// map<string, Quantity>
    MapQty,
    RepStr,
    RepMsg(&'static str),
}

fn schema(msg: &str, field: u64) -> Option<(&'static str, T)> {
    use T::*;
    Some(match (msg, field) {
        ("Deployment", 1) => ("metadata", Msg("ObjectMeta")),
        ("Deployment", 2) => ("spec", Msg("DeploymentSpec")),
        ("ObjectMeta", 1) => ("name", Str),
        ("ObjectMeta", 2) => ("generateName", Str),
        ("ObjectMeta", 3) => ("namespace", Str),
        ("ObjectMeta", 11) => ("labels", MapStr),
        ("ObjectMeta", 12) => ("annotations", MapStr),
        ("DeploymentSpec", 1) => ("replicas", Int),
        ("DeploymentSpec", 2) => ("selector", Msg("LabelSelector")),
        ("DeploymentSpec", 3) => ("template", Msg("PodTemplateSpec")),
        ("DeploymentSpec", 4) => ("strategy", Msg("DeploymentStrategy")),
        ("DeploymentSpec", 5) => ("minReadySeconds", Int),
        ("DeploymentSpec", 6) => ("revisionHistoryLimit", Int),
        ("DeploymentSpec", 7) => ("paused", Bool),
        ("DeploymentSpec", 9) => ("progressDeadlineSeconds", Int),
        ("DeploymentStrategy", 1) => ("type", Str),
        ("LabelSelector", 1) => ("matchLabels", MapStr),
        ("PodTemplateSpec", 1) => ("metadata", Msg("ObjectMeta")),
        ("PodTemplateSpec", 2) => ("spec", Msg("PodSpec")),
        ("PodSpec", 2) => ("containers", RepMsg("Container")),
        ("PodSpec", 3) => ("restartPolicy", Str),
        ("PodSpec", 4) => ("terminationGracePeriodSeconds", Int),
        ("PodSpec", 8) => ("serviceAccountName", Str),
        ("PodSpec", 20) => ("initContainers", RepMsg("Container")),
        ("Container", 1) => ("name", Str),
        ("Container", 2) => ("image", Str),
        ("Container", 3) => ("command", RepStr),
        ("Container", 4) => ("args", RepStr),
        ("Container", 5) => ("workingDir", Str),
        ("Container", 6) => ("ports", RepMsg("ContainerPort")),
        ("Container", 7) => ("env", RepMsg("EnvVar")),
        ("Container", 8) => ("resources", Msg("ResourceRequirements")),
        ("Container", 13) => ("terminationMessagePath", Str),
        ("Container", 14) => ("imagePullPolicy", Str),
        ("ContainerPort", 1) => ("name", Str),
        ("ContainerPort", 3) => ("containerPort", Int),
        ("ContainerPort", 4) => ("protocol", Str),
        ("EnvVar", 1) => ("name", Str),
        ("EnvVar", 2) => ("value", Str),
        ("ResourceRequirements", 1) => ("limits", MapQty),
        ("ResourceRequirements", 2) => ("requests", MapQty),
        _ => return None,
    })
}

/// The kinds this module can decode.
pub fn supported(kind: &str) -> bool {
    kind == "Deployment"
}

struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.b.get(self.i)?;
            self.i += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.varint()? as usize;
        let s = self.b.get(self.i..self.i.checked_add(n)?)?;
        self.i += n;
        Some(s)
    }
    /// (field, wire type), or None at the end.
    fn key(&mut self) -> Option<(u64, u64)> {
        if self.i >= self.b.len() {
            return None;
        }
        let k = self.varint()?;
        Some((k >> 3, k & 7))
    }
    fn skip(&mut self, wire: u64) -> Option<()> {
        match wire {
            0 => {
                self.varint()?;
            }
            1 => self.i += 8,
            2 => {
                self.bytes()?;
            }
            5 => self.i += 4,
            _ => return None,
        }
        (self.i <= self.b.len()).then_some(())
    }
}

fn string(b: &[u8]) -> Value {
    Value::String(String::from_utf8_lossy(b).into_owned())
}

/// A map entry: key = 1, value = 2.
fn entry(b: &[u8], qty: bool) -> Option<(String, Value)> {
    let mut r = Reader { b, i: 0 };
    let (mut k, mut v) = (String::new(), Value::String(String::new()));
    while let Some((f, w)) = r.key() {
        match (f, w) {
            (1, 2) => k = String::from_utf8_lossy(r.bytes()?).into_owned(),
            (2, 2) if qty => {
                // Quantity { string = 1 }
                let inner = r.bytes()?;
                let mut q = Reader { b: inner, i: 0 };
                while let Some((qf, qw)) = q.key() {
                    if qf == 1 && qw == 2 {
                        v = string(q.bytes()?);
                    } else {
                        q.skip(qw)?;
                    }
                }
            }
            (2, 2) => v = string(r.bytes()?),
            _ => r.skip(w)?,
        }
    }
    Some((k, v))
}

fn message(msg: &str, b: &[u8]) -> Option<Value> {
    let mut r = Reader { b, i: 0 };
    let mut out = Map::new();
    while let Some((f, w)) = r.key() {
        let Some((name, t)) = schema(msg, f) else {
            r.skip(w)?;
            continue;
        };
        match (t, w) {
            (T::Str, 2) => {
                let s = string(r.bytes()?);
                if s != "" {
                    out.insert(name.into(), s);
                }
            }
            (T::Int, 0) => {
                let v = r.varint()? as i64;
                out.insert(name.into(), json!(v));
            }
            (T::Bool, 0) => {
                let v = r.varint()? != 0;
                out.insert(name.into(), json!(v));
            }
            (T::Msg(m), 2) => {
                let v = message(m, r.bytes()?)?;
                if v.as_object().is_some_and(|o| !o.is_empty()) {
                    out.insert(name.into(), v);
                }
            }
            (T::MapStr | T::MapQty, 2) => {
                let (k, v) = entry(r.bytes()?, matches!(t, T::MapQty))?;
                out.entry(name)
                    .or_insert_with(|| json!({}))
                    .as_object_mut()?
                    .insert(k, v);
            }
            (T::RepStr, 2) => {
                let s = string(r.bytes()?);
                out.entry(name)
                    .or_insert_with(|| json!([]))
                    .as_array_mut()?
                    .push(s);
            }
            (T::RepMsg(m), 2) => {
                let v = message(m, r.bytes()?)?;
                out.entry(name)
                    .or_insert_with(|| json!([]))
                    .as_array_mut()?
                    .push(v);
            }
            _ => r.skip(w)?,
        }
    }
    Some(Value::Object(out))
}

/// Decodes a `k8s\0`-prefixed protobuf envelope into JSON, or says why not.
pub fn decode(body: &[u8]) -> Result<Value, String> {
    let rest = body
        .strip_prefix(b"k8s\0")
        .ok_or("not a Kubernetes protobuf envelope")?;
    let mut r = Reader { b: rest, i: 0 };
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    while let Some((f, w)) = r.key() {
        match (f, w) {
            (1, 2) => {
                let mut tm = Reader {
                    b: r.bytes().ok_or("truncated")?,
                    i: 0,
                };
                while let Some((tf, tw)) = tm.key() {
                    match (tf, tw) {
                        (1, 2) => {
                            api_version =
                                String::from_utf8_lossy(tm.bytes().ok_or("truncated")?).into()
                        }
                        (2, 2) => {
                            kind = String::from_utf8_lossy(tm.bytes().ok_or("truncated")?).into()
                        }
                        _ => tm.skip(tw).ok_or("truncated")?,
                    }
                }
            }
            (2, 2) => raw = r.bytes().ok_or("truncated")?,
            _ => r.skip(w).ok_or("truncated")?,
        }
    }
    if !supported(&kind) {
        return Err(format!(
            "protobuf {kind} is not supported by this test apiserver; send JSON"
        ));
    }
    let mut v = message(&kind, raw).ok_or("malformed protobuf")?;
    v["apiVersion"] = json!(api_version);
    v["kind"] = json!(kind);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(n: u64, b: &[u8]) -> Vec<u8> {
        let mut out = vec![((n << 3) | 2) as u8, b.len() as u8];
        out.extend_from_slice(b);
        out
    }

    #[test]
    fn decodes_a_deployment() {
        let meta = field(1, b"demo");
        let labels = [field(1, b"app"), field(2, b"demo")].concat();
        let sel = field(1, &labels);
        let port = [vec![3 << 3, 0x90, 0x3f]].concat(); // containerPort 8080
        let container = [field(1, b"c"), field(2, b"img"), field(6, &port)].concat();
        let podspec = field(2, &container);
        let tmpl = [field(1, &field(11, &labels)), field(2, &podspec)].concat();
        let spec = [vec![1 << 3, 3], field(2, &sel), field(3, &tmpl)].concat();
        let dep = [field(1, &meta), field(2, &spec)].concat();
        let tm = [field(1, b"apps/v1"), field(2, b"Deployment")].concat();
        let env = [b"k8s\0".to_vec(), field(1, &tm), field(2, &dep)].concat();
        let v = decode(&env).unwrap();
        assert_eq!(v["kind"], "Deployment");
        assert_eq!(v["metadata"]["name"], "demo");
        assert_eq!(v["spec"]["replicas"], 3);
        assert_eq!(v["spec"]["selector"]["matchLabels"]["app"], "demo");
        let c = &v["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["image"], "img");
        assert_eq!(c["ports"][0]["containerPort"], 8080);
    }
}
