//! The nats-server configurations of a federation, as the templates in `nats-config/` at the
//! root of the repository define them: the hub's (one node, or each node of a cluster), each
//! site's, the hub's leaf user of each site, a site's host-agent users, and the directory
//! bucket's stream. The test kit and `nubis federation init` fill the same templates, so a test
//! federation and a generated deployment cannot drift apart.
//!
//! A template's placeholders are `NAME` in double braces, listed in the template's head comment;
//! values are plain text, inserted without escaping.

/// The hub's configuration (`nats-config/hub.conf`), one per node.
pub const HUB: &str = include_str!("../../../nats-config/hub.conf");
/// The `cluster` block of a node of a clustered hub (`nats-config/hub-cluster.conf`).
pub const HUB_CLUSTER: &str = include_str!("../../../nats-config/hub-cluster.conf");
/// The hub's user for one site's leaf connection (`nats-config/hub-leaf-user.conf`).
pub const HUB_LEAF_USER: &str = include_str!("../../../nats-config/hub-leaf-user.conf");
/// A site's server (`nats-config/leaf.conf`).
pub const LEAF: &str = include_str!("../../../nats-config/leaf.conf");
/// A host agent's user on its site's server (`nats-config/leaf-host-user.conf`).
pub const LEAF_HOST_USER: &str = include_str!("../../../nats-config/leaf-host-user.conf");
/// The directory bucket's stream, as the hub's operator creates it once
/// (`nats-config/directory-bucket.json`).
pub const DIRECTORY_BUCKET: &str = include_str!("../../../nats-config/directory-bucket.json");

/// A placeholder that a template still holds after rendering.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the template's placeholder {placeholder} has no value")]
pub struct Unfilled {
    /// The placeholder, with its braces.
    pub placeholder: String,
}

/// `template` with every placeholder named in `values` replaced by its value; an error names
/// the first placeholder left without one.
pub fn render<'a>(
    template: &str,
    values: impl IntoIterator<Item = (&'a str, String)>,
) -> Result<String, Unfilled> {
    let mut text = template.to_owned();
    for (key, value) in values {
        text = text.replace(&format!("{{{{{key}}}}}"), &value);
    }
    match text.find("{{") {
        None => Ok(text),
        Some(start) => {
            let rest = &text[start..];
            let end = rest.find("}}").map_or(rest.len(), |e| e + 2);
            Err(Unfilled {
                placeholder: rest[..end].to_owned(),
            })
        }
    }
}

/// Asks the server `client` is connected to, once, to create the stream that `config` (a
/// JetStream stream configuration such as [`DIRECTORY_BUCKET`]) describes, as the hub's
/// operator does for the directory. Creating an existing stream with the same configuration
/// succeeds. Returns the server's description of the stream, or why there is none: the
/// server's error, a failed request or no answer within `timeout`.
pub async fn create_stream(
    client: &async_nats::Client,
    config: &serde_json::Value,
    timeout: std::time::Duration,
) -> Result<serde_json::Value, String> {
    let name = config
        .get("name")
        .and_then(serde_json::Value::as_str)
        .ok_or("the stream configuration has no `name`")?;
    let body = serde_json::to_vec(config).map_err(|e| e.to_string())?;
    let subject = format!("$JS.API.STREAM.CREATE.{name}");
    match tokio::time::timeout(timeout, client.request(subject, body.into())).await {
        Ok(Ok(msg)) => {
            let reply: serde_json::Value =
                serde_json::from_slice(&msg.payload).map_err(|e| e.to_string())?;
            match reply.get("error") {
                None => Ok(reply),
                Some(error) => Err(error.to_string()),
            }
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer in {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_placeholder_must_have_a_value() {
        let filled = render("a {{X}} b {{Y}}", [("X", "1".into()), ("Y", "2".into())]);
        assert_eq!(filled.as_deref(), Ok("a 1 b 2"));
        let unfilled = render("a {{X}} b {{Y}}", [("X", "1".into())]);
        assert_eq!(
            unfilled,
            Err(Unfilled {
                placeholder: "{{Y}}".into()
            })
        );
    }

    #[test]
    fn the_directory_bucket_is_valid_json_with_a_name() {
        let config: serde_json::Value =
            serde_json::from_str(DIRECTORY_BUCKET).expect("directory-bucket.json parses");
        assert_eq!(config["name"], "KV_nubis-directory");
    }
}
