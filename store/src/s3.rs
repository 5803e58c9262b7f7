//! S3-compatible object storage (AWS S3, MinIO, Ceph RGW, Garage, R2, moto) as an upstream:
//! the `s3://` URL and its settings; the client itself is `objstore.rs`.
//!
//! Configuration follows the AWS conventions (environment, then the shared config and
//! credentials files) so that a machine already set up for the AWS CLI needs nothing more.

use std::collections::HashMap;
use std::io;
use std::path::{Path as FsPath, PathBuf};
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path;
use object_store::ClientConfigKey;

use crate::objstore::{build_pair, client_options, process_env, retry_config, ObjStore};

/// Parses `s3://bucket[/prefix]`; credentials, region and endpoint come from the standard AWS
/// environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION /
/// AWS_DEFAULT_REGION, AWS_ENDPOINT_URL (and AWS_ENDPOINT_URL_S3), AWS_PROFILE) and from the
/// shared config files (~/.aws/credentials and ~/.aws/config, or AWS_SHARED_CREDENTIALS_FILE
/// / AWS_CONFIG_FILE), profile `default` unless AWS_PROFILE. Environment wins over files.
/// Custom endpoints use path-style addressing; an http:// endpoint is allowed. Region
/// defaults to us-east-1. `timeout` bounds connecting and each request's idle time.
pub fn parse(url: &str, timeout: Duration) -> Result<ObjStore, String> {
    parse_in(url, timeout, None)
}

/// As `parse`, with the settings taken from `env` instead of this process's environment
/// when given (a daemon acting for a command uses the command's).
pub fn parse_in(
    url: &str,
    timeout: Duration,
    env: Option<&[(String, String)]>,
) -> Result<ObjStore, String> {
    let (bucket, prefix) = parse_url(url)?;
    if timeout.is_zero() {
        return Err(format!(
            "upstream '{url}': the timeout must be more than zero"
        ));
    }
    let own;
    let env = match env {
        Some(e) => e,
        None => {
            own = process_env();
            &own[..]
        }
    };
    let settings = Settings::resolve(env).map_err(|e| format!("upstream '{url}': {e}"))?;
    let pair = build_pair(url, |reader| {
        settings.builder(&bucket, timeout, reader).build()
    })?;
    let base = if prefix.is_empty() {
        format!("s3://{bucket}")
    } else {
        format!("s3://{bucket}/{prefix}")
    };
    ObjStore::new(base, format!("bucket '{bucket}'"), prefix, pair, timeout)
}

/// `s3://bucket[/prefix]` → (bucket, prefix without surrounding '/').
fn parse_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| format!("upstream '{url}': expected s3://bucket[/prefix]"))?;
    if rest.contains(['?', '#']) {
        return Err(format!(
            "upstream '{url}': query strings and fragments are not part of an s3:// URL"
        ));
    }
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(format!(
            "upstream '{url}': no bucket name (expected s3://bucket[/prefix])"
        ));
    }
    // Broader than AWS's rules (MinIO and Ceph accept some names AWS refuses), but nothing
    // that could change the meaning of a request URL.
    if !bucket
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    {
        return Err(format!(
            "upstream '{url}': '{bucket}' is not a valid bucket name"
        ));
    }
    let prefix = prefix.trim_matches('/');
    if !prefix.is_empty() && Path::parse(prefix).is_err() {
        return Err(format!(
            "upstream '{url}': invalid prefix '{prefix}' (empty, '.' or '..' segments, or control characters)"
        ));
    }
    Ok((bucket.to_owned(), prefix.to_owned()))
}

/// Static credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Creds {
    key_id: String,
    secret: String,
    token: Option<String>,
}

/// What the environment and the shared files say, resolved with the AWS precedence.
#[derive(Debug)]
struct Settings {
    /// None: left to object_store (web identity, container or instance credentials).
    creds: Option<Creds>,
    region: String,
    endpoint: Option<String>,
    /// Other AWS_* variables object_store understands (proxies, checksums, web identity...).
    passthrough: Vec<(AmazonS3ConfigKey, String)>,
}

impl Settings {
    fn resolve(env: &[(String, String)]) -> Result<Settings, String> {
        let var = |k: &str| {
            env.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let home = var("HOME").map(PathBuf::from);
        let expand = |p: String| match (p.strip_prefix("~/"), &home) {
            (Some(rest), Some(h)) => h.join(rest),
            _ => PathBuf::from(p),
        };
        let default_path = |name: &str| home.as_ref().map(|h| h.join(".aws").join(name));
        let config_path = var("AWS_CONFIG_FILE")
            .map(expand)
            .or_else(|| default_path("config"));
        let creds_path = var("AWS_SHARED_CREDENTIALS_FILE")
            .map(expand)
            .or_else(|| default_path("credentials"));
        let config = match &config_path {
            Some(p) => read_ini(p)?,
            None => HashMap::new(),
        };
        let creds_file = match &creds_path {
            Some(p) => read_ini(p)?,
            None => HashMap::new(),
        };
        let chosen = var("AWS_PROFILE");
        let profile_name = chosen.clone().unwrap_or_else(|| "default".to_owned());
        let from_config = config_profile(&config, &profile_name);
        let from_creds = creds_file.get(&profile_name);
        if chosen.is_some() && from_config.is_none() && from_creds.is_none() {
            let show = |p: &Option<PathBuf>| {
                p.as_ref()
                    .map_or("(no HOME)".to_owned(), |p| p.display().to_string())
            };
            return Err(format!(
                "AWS_PROFILE={profile_name}: no such profile in {} or {}",
                show(&config_path),
                show(&creds_path)
            ));
        }
        let prof = |k: &str| {
            from_creds
                .and_then(|p| p.get(k))
                .or_else(|| from_config.and_then(|p| p.get(k)))
                .filter(|v| !v.is_empty())
                .cloned()
        };

        let creds = match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
            (Some(key_id), Some(secret)) => Some(Creds {
                key_id,
                secret,
                token: var("AWS_SESSION_TOKEN"),
            }),
            (Some(_), None) => {
                return Err("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not".into())
            }
            (None, Some(_)) => {
                return Err("AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not".into())
            }
            (None, None) => match (prof("aws_access_key_id"), prof("aws_secret_access_key")) {
                (Some(key_id), Some(secret)) => Some(Creds {
                    key_id,
                    secret,
                    token: prof("aws_session_token"),
                }),
                (None, None) => None,
                _ => {
                    return Err(format!(
                        "profile '{profile_name}' has only one of aws_access_key_id and aws_secret_access_key"
                    ))
                }
            },
        };

        let region = var("AWS_REGION")
            .or_else(|| var("AWS_DEFAULT_REGION"))
            .or_else(|| prof("region"))
            .unwrap_or_else(|| "us-east-1".to_owned());

        let ignore_endpoints = var("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let endpoint = if ignore_endpoints {
            None
        } else {
            var("AWS_ENDPOINT_URL_S3")
                .or_else(|| var("AWS_ENDPOINT_URL"))
                .or_else(|| var("AWS_ENDPOINT"))
                .or_else(|| prof("s3.endpoint_url"))
                .or_else(|| prof("endpoint_url"))
        };
        if let Some(e) = &endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(format!("endpoint '{e}' is not an http:// or https:// URL"));
            }
        }

        let mut passthrough = Vec::new();
        for (name, value) in env {
            if !name.starts_with("AWS_") || value.is_empty() {
                continue;
            }
            let Ok(key) = name.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() else {
                continue;
            };
            // Resolved above (with the files), or ours to decide.
            let ours = matches!(
                key,
                AmazonS3ConfigKey::AccessKeyId
                    | AmazonS3ConfigKey::SecretAccessKey
                    | AmazonS3ConfigKey::Token
                    | AmazonS3ConfigKey::Region
                    | AmazonS3ConfigKey::DefaultRegion
                    | AmazonS3ConfigKey::Endpoint
                    | AmazonS3ConfigKey::S3Endpoint
                    | AmazonS3ConfigKey::Bucket
                    | AmazonS3ConfigKey::Client(
                        ClientConfigKey::Timeout
                            | ClientConfigKey::ConnectTimeout
                            | ClientConfigKey::ReadTimeout
                    )
            );
            if !ours {
                passthrough.push((key, value.clone()));
            }
        }

        Ok(Settings {
            creds,
            region,
            endpoint,
            passthrough,
        })
    }

    fn builder(&self, bucket: &str, timeout: Duration, reader: bool) -> AmazonS3Builder {
        let opts = client_options(timeout, reader);
        let retry = retry_config(timeout);
        let mut b = AmazonS3Builder::new()
            .with_client_options(opts)
            .with_retry(retry);
        // After the client options: these adjust them rather than replace them.
        for (key, value) in &self.passthrough {
            b = b.with_config(*key, value);
        }
        b = b.with_bucket_name(bucket).with_region(&self.region);
        if let Some(c) = &self.creds {
            b = b
                .with_access_key_id(&c.key_id)
                .with_secret_access_key(&c.secret);
            if let Some(t) = &c.token {
                b = b.with_token(t);
            }
        }
        if let Some(e) = &self.endpoint {
            b = b.with_endpoint(e.trim_end_matches('/'));
            if e.starts_with("http://") {
                b = b.with_allow_http(true);
            }
        }
        b
    }
}

/// The `[profile name]` section of a config file (`[default]` for the default profile).
fn config_profile<'a>(
    config: &'a HashMap<String, HashMap<String, String>>,
    name: &str,
) -> Option<&'a HashMap<String, String>> {
    config.get(&format!("profile {name}")).or_else(|| {
        if name == "default" {
            config.get("default")
        } else {
            None
        }
    })
}

/// A shared config or credentials file; a missing file is an empty one.
fn read_ini(path: &FsPath) -> Result<HashMap<String, HashMap<String, String>>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(parse_ini(&text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(HashMap::new()),
        Err(e) => Err(format!("reading {}: {e}", path.display())),
    }
}

/// The AWS flavour of INI: `[section]` headers (section names with inner whitespace
/// collapsed, so `[profile  x]` is `profile x`), `key = value` lines, whole-line comments with
/// `#` or `;` and trailing ones after whitespace, and indented sub-properties under a key with
/// an empty value (`s3 =` then `  endpoint_url = ...`), stored as `s3.endpoint_url`.
fn parse_ini(text: &str) -> HashMap<String, HashMap<String, String>> {
    let mut out: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut section: Option<String> = None;
    let mut parent: Option<String> = None;
    for raw in text.lines() {
        let indented = raw.starts_with([' ', '\t']);
        let line = strip_comment(raw).trim();
        if line.is_empty() {
            continue;
        }
        if !indented && line.starts_with('[') {
            section = line
                .strip_prefix('[')
                .and_then(|l| l.strip_suffix(']'))
                .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "));
            parent = None;
            continue;
        }
        let Some(sec) = &section else { continue };
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_owned());
        let props = out.entry(sec.clone()).or_default();
        if indented {
            if let Some(p) = &parent {
                props.insert(format!("{p}.{k}"), v);
            }
            continue;
        }
        parent = v.is_empty().then(|| k.clone());
        props.insert(k, v);
    }
    out
}

fn strip_comment(line: &str) -> &str {
    let t = line.trim_start();
    if t.starts_with(['#', ';']) {
        return "";
    }
    let bytes = line.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if (b == b'#' || b == b';') && i > 0 && bytes[i - 1].is_ascii_whitespace() {
            return &line[..i];
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objstore::{error_text, shorten_xml, status_in};
    use std::fmt;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn ini_sections_comments_and_subproperties() {
        let text = "\
# a comment
[default]
region = eu-west-1   # trailing comment
aws_access_key_id=AKIA1
; another comment

[profile  dev ]
endpoint_url = http://localhost:9000
s3 =
  endpoint_url = http://localhost:9001
  addressing_style = path
region = us-west-2
[dev]
aws_secret_access_key = se#cret
junk line without equals
";
        let ini = parse_ini(text);
        let d = &ini["default"];
        assert_eq!(d["region"], "eu-west-1");
        assert_eq!(d["aws_access_key_id"], "AKIA1");
        let p = &ini["profile dev"];
        assert_eq!(p["endpoint_url"], "http://localhost:9000");
        assert_eq!(p["s3.endpoint_url"], "http://localhost:9001");
        assert_eq!(p["s3.addressing_style"], "path");
        assert_eq!(p["region"], "us-west-2");
        assert!(!p.contains_key("addressing_style"));
        // '#' inside a value (not after whitespace) is part of it.
        assert_eq!(ini["dev"]["aws_secret_access_key"], "se#cret");
        assert_eq!(ini.len(), 3);
    }

    #[test]
    fn ini_ignores_lines_before_any_section() {
        let ini = parse_ini("region = x\n[default]\nregion = y\n");
        assert_eq!(ini.len(), 1);
        assert_eq!(ini["default"]["region"], "y");
    }

    #[test]
    fn profile_files_and_environment_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config");
        let creds = dir.path().join("credentials");
        std::fs::write(
            &config,
            "[default]\nregion = eu-central-1\n[profile work]\nregion = ap-south-1\n\
             endpoint_url = http://127.0.0.1:9\naws_access_key_id = CFGKEY\n\
             aws_secret_access_key = CFGSECRET\n",
        )
        .unwrap();
        std::fs::write(
            &creds,
            "[default]\naws_access_key_id = DEFKEY\naws_secret_access_key = DEFSECRET\n\
             [work]\naws_access_key_id = WORKKEY\naws_secret_access_key = WORKSECRET\n\
             aws_session_token = WORKTOKEN\n",
        )
        .unwrap();
        let files = [
            ("AWS_CONFIG_FILE", config.to_str().unwrap()),
            ("AWS_SHARED_CREDENTIALS_FILE", creds.to_str().unwrap()),
            ("HOME", "/nonexistent"),
        ];

        // Default profile from the files.
        let s = Settings::resolve(&env(&files)).unwrap();
        assert_eq!(s.region, "eu-central-1");
        assert_eq!(s.creds.as_ref().unwrap().key_id, "DEFKEY");
        assert_eq!(s.endpoint, None);

        // A named profile: the credentials file wins over the config file.
        let mut e = env(&files);
        e.push(("AWS_PROFILE".into(), "work".into()));
        let s = Settings::resolve(&e).unwrap();
        assert_eq!(s.region, "ap-south-1");
        assert_eq!(
            s.creds,
            Some(Creds {
                key_id: "WORKKEY".into(),
                secret: "WORKSECRET".into(),
                token: Some("WORKTOKEN".into()),
            })
        );
        assert_eq!(s.endpoint.as_deref(), Some("http://127.0.0.1:9"));

        // The environment wins over every file.
        e.extend(env(&[
            ("AWS_ACCESS_KEY_ID", "ENVKEY"),
            ("AWS_SECRET_ACCESS_KEY", "ENVSECRET"),
            ("AWS_DEFAULT_REGION", "sa-east-1"),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:10"),
        ]));
        let s = Settings::resolve(&e).unwrap();
        assert_eq!(
            s.creds,
            Some(Creds {
                key_id: "ENVKEY".into(),
                secret: "ENVSECRET".into(),
                token: None,
            })
        );
        assert_eq!(s.region, "sa-east-1");
        assert_eq!(s.endpoint.as_deref(), Some("http://127.0.0.1:10"));
        e.push(("AWS_REGION".into(), "us-west-1".into()));
        e.push(("AWS_ENDPOINT_URL_S3".into(), "https://s3.example".into()));
        let s = Settings::resolve(&e).unwrap();
        assert_eq!(s.region, "us-west-1");
        assert_eq!(s.endpoint.as_deref(), Some("https://s3.example"));
        assert!(s.passthrough.is_empty(), "{:?}", s.passthrough);
    }

    #[test]
    fn missing_profile_and_half_credentials_are_errors() {
        let e = env(&[("HOME", "/nonexistent"), ("AWS_PROFILE", "nope")]);
        let err = Settings::resolve(&e).unwrap_err();
        assert!(err.contains("AWS_PROFILE=nope"), "{err}");
        let e = env(&[("HOME", "/nonexistent"), ("AWS_ACCESS_KEY_ID", "k")]);
        let err = Settings::resolve(&e).unwrap_err();
        assert!(err.contains("AWS_SECRET_ACCESS_KEY"), "{err}");
        let e = env(&[
            ("HOME", "/nonexistent"),
            ("AWS_ENDPOINT_URL", "localhost:9000"),
        ]);
        let err = Settings::resolve(&e).unwrap_err();
        assert!(err.contains("localhost:9000"), "{err}");
    }

    #[test]
    fn nothing_configured_gives_defaults() {
        let s = Settings::resolve(&env(&[("HOME", "/nonexistent")])).unwrap();
        assert_eq!(s.region, "us-east-1");
        assert_eq!(s.creds, None);
        assert_eq!(s.endpoint, None);
    }

    #[test]
    fn other_aws_variables_pass_through() {
        let s = Settings::resolve(&env(&[
            ("HOME", "/nonexistent"),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_TIMEOUT", "1s"),
            ("AWS_PROFILE_UNKNOWN_THING", "x"),
            ("AWS_SESSION_TOKEN", "orphan"),
        ]))
        .unwrap();
        let keys: Vec<_> = s.passthrough.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            keys,
            vec![AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp)]
        );
        // A session token without keys is not used.
        assert_eq!(s.creds, None);
    }

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("s3://b").unwrap(),
            ("b".to_owned(), String::new())
        );
        assert_eq!(
            parse_url("s3://b/p/q/").unwrap(),
            ("b".to_owned(), "p/q".to_owned())
        );
        for bad in [
            "s3://",
            "s3:///x",
            "http://b",
            "s3://b/a//c",
            "s3://b/..",
            "s3://b c",
            "s3://b?x=1",
        ] {
            let err = parse_url(bad).unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn statuses_and_messages() {
        assert_eq!(
            status_in("Error performing PUT x in 1s - Server returned non-2xx status code: 503 Service Unavailable: <Code>SlowDown</Code>"),
            Some(503)
        );
        assert_eq!(status_in("no status here"), None);
        assert_eq!(status_in("status code: 4"), None);
        #[derive(Debug)]
        struct Outer(io::Error);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("outer")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = Outer(io::Error::other("inner"));
        assert_eq!(error_text(&e), "outer: inner");
        assert_eq!(
            shorten_xml(
                "x: 404 Not Found: <?xml version=\"1.0\"?>\n<Error><Code>NoSuchBucket</Code>\
                 <Message>The specified bucket does not exist</Message><RequestId>1</RequestId>\
                 </Error> tail"
            ),
            "x: 404 Not Found: NoSuchBucket (The specified bucket does not exist) tail"
        );
        assert_eq!(shorten_xml("plain"), "plain");
        assert_eq!(shorten_xml("<Error>broken"), "<Error>broken");
    }
}
