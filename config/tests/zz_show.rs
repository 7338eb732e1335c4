#![allow(clippy::unwrap_used)]
mod common;
use common::*;
#[test]
fn show() {
    let m = MINIMAL;
    for t in [
        format!("{m}\n[proxy]\nlisen = 1\n"),
        format!("{m}\n[proxies]\nlisen = 1\n"),
        format!("{m}\n[[tables]]\nname='a'\nphase='done'\nshare=1\n"),
        format!("{m}\n[proxy]\nmax_connections = 'many'\n"),
        "[old]\nurl = \"postgres://u@h/d\n".to_string(),
        "[proxy]\nlisten = \"x\"\n[auth]\nmethod = \"nope\"\n[[tables]]\nname = \"t\"\nphase = \"p\"\nread_share = 500\n".to_string(),
        format!("{m}\n[proxy]\nlisten = 6432\n"),
        format!("{m}\n[[tables]]\nname = 5\nphase='done'\n"),
    ] {
        println!("-----\n{}", error(&t));
    }
    println!("-----\n{}", error_in(m, env(&[("SWITCHYARD_PROXY__LISEN","1")]), std::path::Path::new(".")));
    println!("-----\n{}", error_in(m, env(&[("SWITCHYARD_PROXY__MAX_CONNECTIONS","x")]), std::path::Path::new(".")));
    println!("-----\n{}", error_in(&m.replace("method = \"trust\"", "users_file='nope.toml'"), no_env(), std::path::Path::new("/tmp")));
    println!("-----\n{}", switchyard_config::UsersFile::from_toml_str("[[users]]\nname='a'\npasswd='x'\n", switchyard_config::AuthMethod::Trust).unwrap_err());
    println!("-----\n{}", toml::to_string(&parse(m)).unwrap());
    println!("-----\n{:#?}", parse(m));
}
