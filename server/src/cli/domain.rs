//! `waypost domain add|list|remove`: apps' custom domains, served by the HTTPS ingress with their
//! own certificate (transport/api/domains.rs).

use super::TableOrJson;
use anyhow::{Context as _, Result};
use clap::Subcommand;
use hyper::Method;
use serde_json::{Value, json};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum DomainCmd {
    /// Serve an app at DOMAIN too, with that domain's certificate (by SNI on the HTTPS ingress;
    /// Host: DOMAIN routes to the app on both ingress listeners). Adding a domain the app has
    /// already replaces its certificate (a renewal).
    ///
    /// The certificate must cover DOMAIN, be valid now and match the key. Point DOMAIN's DNS at
    /// the ingress yourself.
    Add {
        /// The app (default: $WAYPOST_APP).
        #[arg(short = 'a', long, env = "WAYPOST_APP")]
        app: String,
        /// The domain, e.g. www.example.com.
        domain: String,
        /// The certificate chain, PEM, the domain's certificate first.
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
        /// The certificate's private key, PEM. It is stored in the server's database.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
    },
    /// List custom domains: domain, app, certificate subject and expiry, https URL.
    List {
        /// Only this app's domains (default: $WAYPOST_APP, else every app's).
        #[arg(short = 'a', long, env = "WAYPOST_APP")]
        app: Option<String>,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = TableOrJson::Table)]
        output: TableOrJson,
    },
    /// Stop serving an app at DOMAIN (its certificate and key are deleted).
    Remove { domain: String },
}

fn read(what: &str, path: &PathBuf) -> Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("reading the {what} file {}", path.display()))
}

pub async fn run(cmd: DomainCmd) -> Result<()> {
    let c = super::client()?;
    match cmd {
        DomainCmd::Add {
            app,
            domain,
            cert,
            key,
        } => {
            let body = json!({
                "app": app,
                "domain": domain,
                "cert_pem": read("certificate", &cert)?,
                "key_pem": read("key", &key)?,
            });
            let d: Value = c.call(Method::POST, "/v1/domains", Some(&body)).await?;
            println!(
                "app {} is served at {} (certificate {}, expires {})",
                d["app"].as_str().unwrap_or_default(),
                d["domain"].as_str().unwrap_or_default(),
                d["subject"].as_str().unwrap_or_default(),
                d["not_after"].as_str().unwrap_or_default(),
            );
            match d["url"].as_str() {
                Some(url) => println!("{url}"),
                None => eprintln!(
                    "note: the server has no HTTPS ingress (--ingress-tls-addr); plain HTTP \
                     requests for {} reach the app",
                    d["domain"].as_str().unwrap_or_default()
                ),
            }
        }
        DomainCmd::List { app, output } => {
            let path = match &app {
                Some(a) => format!("/v1/domains?app={}", crate::util::percent_encode(a)),
                None => "/v1/domains".to_string(),
            };
            let v: Value = c.get(&path).await?;
            if output == TableOrJson::Json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let mut rows = vec![
                ["DOMAIN", "APP", "SUBJECT", "EXPIRES", "URL"]
                    .map(String::from)
                    .to_vec(),
            ];
            for d in v["domains"].as_array().into_iter().flatten() {
                let s = |k: &str| d[k].as_str().unwrap_or("-").to_string();
                rows.push(vec![
                    s("domain"),
                    s("app"),
                    s("subject"),
                    s("not_after"),
                    s("url"),
                ]);
            }
            super::print_table(&rows);
        }
        DomainCmd::Remove { domain } => {
            let path = format!("/v1/domains/{}", crate::util::percent_encode(domain.trim()));
            let d: Value = c.call(Method::DELETE, &path, None).await?;
            println!(
                "removed domain {} of app {}",
                d["domain"].as_str().unwrap_or_default(),
                d["app"].as_str().unwrap_or_default()
            );
        }
    }
    Ok(())
}
