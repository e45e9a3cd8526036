//! Spec conformance tables (checklist /work/shared/reference/cni-spec-checklist.md,
//! sections 1.1-1.12). Every row is data; the drivers at the bottom of each
//! section feed it through the same path the plugin skeleton uses.
use std::collections::HashMap;

use serde_json::{json, Map, Value};
use tern_cni::args::CniArgs;
use tern_cni::{select_version, validate, CniError, CniResult, Command, Env, NetConf, NetConfList, Version};

// ---------------------------------------------------------------------------
// Stdin builders: `c10!(r#","k":v"#)` is a 1.0.0 config for plugin `tern`
// on network `net` plus the given keys.
macro_rules! conf {
    ($v:literal, $rest:literal) => {
        concat!(r#"{"cniVersion":""#, $v, r#"","name":"net","type":"tern""#, $rest, "}")
    };
}
macro_rules! c10 {
    ($rest:literal) => {
        conf!("1.0.0", $rest)
    };
}
macro_rules! c11 {
    ($rest:literal) => {
        conf!("1.1.0", $rest)
    };
}
macro_rules! c02 {
    ($rest:literal) => {
        conf!("0.2.0", $rest)
    };
}
const C10: &str = c10!("");
const C11: &str = c11!("");

// ---------------------------------------------------------------------------
// 1. The skeleton path: CNI_* env + stdin -> Env::from_lookup -> NetConf::parse
//    (for the given command, all versions supported). C1-C4, N2, P1-P4, E2-E5,
//    I1, I2, K6, S5, G1, G5, CA1, 1.9.

#[derive(Clone, Copy)]
enum Want {
    /// Accepted; the config's version (empty for VERSION, which reads no config).
    Ok(&'static str, fn(&Env, Option<&NetConf>) -> bool),
    /// Rejected with this code; the message contains the needle (the field).
    Err(u32, &'static str),
}
use Want::Err as E;

fn any(_: &Env, _: Option<&NetConf>) -> bool {
    true
}
const fn ok(v: &'static str) -> Want {
    Want::Ok(v, any)
}

struct Row {
    label: &'static str,
    /// CNI_COMMAND; empty means not set.
    cmd: &'static str,
    /// Changes to the default env, `|`-separated: `K=V` sets (`K=` sets empty), `-K` removes.
    env: &'static str,
    stdin: &'static str,
    want: Want,
}
const fn r(label: &'static str, cmd: &'static str, env: &'static str, stdin: &'static str, want: Want) -> Row {
    Row { label, cmd, env, stdin, want }
}

// Probes for accepted rows.
fn del_without_netns(e: &Env, _: Option<&NetConf>) -> bool {
    e.netns.is_none() && e.container_id() == "ctr1"
}
fn gc_env_empty(e: &Env, c: Option<&NetConf>) -> bool {
    e.container_id.is_none()
        && e.netns.is_none()
        && e.ifname.is_none()
        && c.unwrap().valid_attachments.as_ref().unwrap().len() == 1
}
fn gc_new_key_wins(_: &Env, c: Option<&NetConf>) -> bool {
    c.unwrap().valid_attachments.as_ref().unwrap()[0].container_id == "new"
}
fn gc_old_key(_: &Env, c: Option<&NetConf>) -> bool {
    c.unwrap().valid_attachments.as_ref().unwrap()[0].container_id == "old"
}
fn gc_empty_list(_: &Env, c: Option<&NetConf>) -> bool {
    c.unwrap().valid_attachments.as_ref().is_some_and(|v| v.is_empty())
}
fn no_attachments(_: &Env, c: Option<&NetConf>) -> bool {
    c.unwrap().valid_attachments.is_none()
}
fn path_split(e: &Env, _: Option<&NetConf>) -> bool {
    e.path == ["/a", "/b"]
}
fn args_parsed(e: &Env, _: Option<&NetConf>) -> bool {
    e.args.get("K8S_POD_NAME") == Some("p") && e.args.ignore_unknown()
}
fn prev_dual_stack(_: &Env, c: Option<&NetConf>) -> bool {
    let p = c.unwrap().prev_result.as_ref().unwrap();
    p.ips.len() == 2 && p.routes.len() == 2 && p.interfaces.is_empty()
}
fn prev_no_gateway(_: &Env, c: Option<&NetConf>) -> bool {
    let p = c.unwrap().prev_result.as_ref().unwrap();
    p.ips[0].gateway.is_none() && p.routes[0].gw.is_none()
}
fn null_lists(_: &Env, c: Option<&NetConf>) -> bool {
    let c = c.unwrap();
    c.runtime_config.port_mappings.is_empty() && c.runtime_config.ips.is_empty() && c.dns.as_ref().unwrap().is_empty()
}
fn keeps_unknown(_: &Env, c: Option<&NetConf>) -> bool {
    let c = c.unwrap();
    c.raw.contains_key("capabilities") && c.raw.contains_key("zzz") && c.runtime_config.other.contains_key("deviceID")
}
fn typed_runtime_config(_: &Env, c: Option<&NetConf>) -> bool {
    let rc = &c.unwrap().runtime_config;
    rc.port_mappings[0].protocol == "tcp"
        && rc.port_mappings[0].host_port == 80
        && rc.bandwidth.as_ref().unwrap().ingress_rate == 8
}

#[rustfmt::skip]
const PROTOCOL: &[Row] = &[
    // --- stdin is not a JSON object (code 6) ---
    r("not JSON",                  "ADD", "", "{",                        E(6, "error unmarshall network config")),
    r("not JSON text",             "ADD", "", "cniVersion=1.0.0",         E(6, "error unmarshall network config")),
    r("empty stdin",               "ADD", "", "",                         E(6, "error unmarshall network config")),
    r("JSON array",                "ADD", "", "[]",                       E(6, "not a JSON object")),
    r("JSON string",               "ADD", "", r#""x""#,                   E(6, "not a JSON object")),
    r("JSON null",                 "DEL", "", "null",                     E(6, "not a JSON object")),
    r("trailing garbage",          "ADD", "", r#"{"name":"n"} x"#,        E(6, "error unmarshall network config")),
    // --- cniVersion (C1, C4) ---
    r("cniVersion 2.0.0",          "ADD", "", conf!("2.0.0", ""),         E(1, "incompatible CNI versions")),
    r("cniVersion 1.0.1",          "ADD", "", conf!("1.0.1", ""),         E(1, "incompatible CNI versions")),
    r("cniVersion 1.2.0 (future)", "DEL", "", conf!("1.2.0", ""),         E(1, "incompatible CNI versions")),
    r("cniVersion 7",              "ADD", "", r#"{"cniVersion":7,"name":"net","type":"tern"}"#,        E(7, "cniVersion")),
    r("cniVersion list",           "ADD", "", r#"{"cniVersion":["1.0.0"],"name":"net","type":"tern"}"#, E(7, "cniVersion")),
    r("cniVersion x.y",            "ADD", "", conf!("x.y", ""),           E(6, "cniVersion")),
    r("cniVersion 1.0",            "ADD", "", conf!("1.0", ""),           E(6, "cniVersion")),
    r("cniVersion v1.0.0",         "ADD", "", conf!("v1.0.0", ""),        E(6, "cniVersion")),
    // --- name (N2) ---
    r("name missing",              "ADD", "", r#"{"cniVersion":"1.0.0","type":"tern"}"#,              E(7, "name")),
    r("name null",                 "ADD", "", r#"{"cniVersion":"1.0.0","name":null,"type":"tern"}"#,  E(7, "name")),
    r("name empty",                "ADD", "", r#"{"cniVersion":"1.0.0","name":"","type":"tern"}"#,    E(7, "missing network name")),
    r("name with space",           "ADD", "", r#"{"cniVersion":"1.0.0","name":"bad name","type":"tern"}"#, E(7, "invalid characters found in network name")),
    r("name with slash",           "ADD", "", r#"{"cniVersion":"1.0.0","name":"a/b","type":"tern"}"#, E(7, "name")),
    r("name leading dash",         "ADD", "", r#"{"cniVersion":"1.0.0","name":"-n","type":"tern"}"#,  E(7, "name")),
    r("name number",               "ADD", "", r#"{"cniVersion":"1.0.0","name":3,"type":"tern"}"#,     E(7, "name")),
    // --- type (P1) ---
    r("type missing",              "ADD", "", r#"{"cniVersion":"1.0.0","name":"net"}"#,               E(7, "type")),
    r("type empty",                "ADD", "", r#"{"cniVersion":"1.0.0","name":"net","type":""}"#,     E(7, "type")),
    r("type ../x",                 "ADD", "", r#"{"cniVersion":"1.0.0","name":"net","type":"../x"}"#, E(7, "type")),
    r("type with backslash",       "ADD", "", r#"{"cniVersion":"1.0.0","name":"net","type":"a\\b"}"#, E(7, "type")),
    r("type ..",                   "ADD", "", r#"{"cniVersion":"1.0.0","name":"net","type":".."}"#,   E(7, "type")),
    r("type number",               "ADD", "", r#"{"cniVersion":"1.0.0","name":"net","type":5}"#,      E(7, "type")),
    // --- well-known keys (P4) ---
    r("ipam string",               "ADD", "", c10!(r#","ipam":"str""#),                    E(7, "ipam")),
    r("ipam list",                 "ADD", "", c10!(r#","ipam":[]"#),                       E(7, "ipam")),
    r("dns string",                "ADD", "", c10!(r#","dns":"8.8.8.8""#),                 E(7, "dns")),
    r("dns.nameservers not list",  "ADD", "", c10!(r#","dns":{"nameservers":"8.8.8.8"}"#), E(7, "dns.nameservers")),
    r("dns.domain number",         "ADD", "", c10!(r#","dns":{"domain":5}"#),              E(7, "dns.domain")),
    r("dns.search of numbers",     "ADD", "", c10!(r#","dns":{"search":[1]}"#),            E(7, "dns.search[0]")),
    // --- runtimeConfig (CONV capability args) ---
    r("runtimeConfig string",      "ADD", "", c10!(r#","runtimeConfig":"x""#),                            E(7, "runtimeConfig")),
    r("runtimeConfig.ips not list","ADD", "", c10!(r#","runtimeConfig":{"ips":"10.0.0.1"}"#),             E(7, "runtimeConfig.ips")),
    r("runtimeConfig.ips[0] num",  "ADD", "", c10!(r#","runtimeConfig":{"ips":[1]}"#),                    E(7, "runtimeConfig.ips[0]")),
    r("runtimeConfig.ips[1] bad",  "ADD", "", c10!(r#","runtimeConfig":{"ips":["10.0.0.1","nope"]}"#),   E(7, "runtimeConfig.ips[1]")),
    r("runtimeConfig.mac number",  "ADD", "", c10!(r#","runtimeConfig":{"mac":5}"#),                      E(7, "runtimeConfig.mac")),
    r("portMappings object",       "ADD", "", c10!(r#","runtimeConfig":{"portMappings":{}}"#),            E(7, "runtimeConfig.portMappings")),
    r("hostPort string",           "ADD", "", c10!(r#","runtimeConfig":{"portMappings":[{"hostPort":"x","containerPort":80}]}"#),   E(7, "runtimeConfig.portMappings[0].hostPort")),
    r("hostPort 70000",            "ADD", "", c10!(r#","runtimeConfig":{"portMappings":[{"hostPort":70000,"containerPort":80}]}"#), E(7, "runtimeConfig.portMappings[0].hostPort")),
    r("hostPort -1",               "ADD", "", c10!(r#","runtimeConfig":{"portMappings":[{"hostPort":-1,"containerPort":80}]}"#),    E(7, "runtimeConfig.portMappings[0].hostPort")),
    r("hostPort 0",                "ADD", "", c10!(r#","runtimeConfig":{"portMappings":[{"hostPort":0,"containerPort":80}]}"#),     E(7, "runtimeConfig.portMappings[0].hostPort")),
    r("containerPort 0",           "DEL", "", c10!(r#","runtimeConfig":{"portMappings":[{"hostPort":8,"containerPort":0}]}"#),      E(7, "runtimeConfig.portMappings[0].containerPort")),
    r("containerPort missing",     "ADD", "", c10!(r#","runtimeConfig":{"portMappings":[{"hostPort":8080}]}"#),                     E(7, "runtimeConfig.portMappings[0]")),
    r("protocol number",           "ADD", "", c10!(r#","runtimeConfig":{"portMappings":[{"hostPort":1,"containerPort":1,"protocol":6}]}"#), E(7, "runtimeConfig.portMappings[0].protocol")),
    r("bandwidth.ingressRate -1",  "ADD", "", c10!(r#","runtimeConfig":{"bandwidth":{"ingressRate":-1}}"#), E(7, "runtimeConfig.bandwidth.ingressRate")),
    r("bandwidth string",          "ADD", "", c10!(r#","runtimeConfig":{"bandwidth":"fast"}"#),          E(7, "runtimeConfig.bandwidth")),
    // --- prevResult (decoded in the config's version when it has none, C6) ---
    r("prevResult string",         "ADD", "", c10!(r#","prevResult":"x""#),                                           E(6, "prevResult")),
    r("prevResult bad address",    "ADD", "", c10!(r#","prevResult":{"ips":[{"address":"10.0.0.300/24"}]}"#),         E(6, "ips[0].address")),
    r("prevResult address no mask","CHECK","",c10!(r#","prevResult":{"ips":[{"address":"10.0.0.3"}]}"#),             E(6, "ips[0].address")),
    r("prevResult bad gateway",    "ADD", "", c10!(r#","prevResult":{"ips":[{"address":"10.0.0.3/24","gateway":"x"}]}"#), E(6, "ips[0].gateway")),
    r("prevResult iface range",    "ADD", "", c10!(r#","prevResult":{"interfaces":[{"name":"eth0"}],"ips":[{"address":"10.0.0.3/24","interface":1}]}"#), E(6, "ips[0].interface")),
    r("prevResult iface no list",  "DEL", "", c10!(r#","prevResult":{"ips":[{"address":"10.0.0.3/24","interface":0}]}"#), E(6, "ips[0].interface")),
    r("prevResult iface -1",       "ADD", "", c10!(r#","prevResult":{"interfaces":[{"name":"eth0"}],"ips":[{"address":"10.0.0.3/24","interface":-1}]}"#), E(6, "ips[0].interface")),
    r("prevResult interfaces obj", "ADD", "", c10!(r#","prevResult":{"interfaces":{}}"#),                             E(6, "interfaces")),
    r("prevResult route dst",      "ADD", "", c10!(r#","prevResult":{"routes":[{"dst":"default"}]}"#),               E(6, "routes[0].dst")),
    r("prevResult route gw",       "ADD", "", c10!(r#","prevResult":{"routes":[{"dst":"0.0.0.0/0","gw":"gw"}]}"#),   E(6, "routes[0].gw")),
    r("prevResult dns number",     "ADD", "", c10!(r#","prevResult":{"dns":{"nameservers":5}}"#),                    E(6, "dns.nameservers")),
    r("prevResult cniVersion num", "ADD", "", c10!(r#","prevResult":{"cniVersion":1}"#),                             E(6, "cniVersion")),
    r("prevResult cniVersion 9.0.0","ADD","", c10!(r#","prevResult":{"cniVersion":"9.0.0"}"#),                       E(1, "prevResult")),
    r("prevResult legacy ip4.ip",  "ADD", "", c02!(r#","prevResult":{"ip4":{"ip":"10.0.0.3"}}"#),                    E(6, "ip4.ip")),
    r("prevResult legacy ip4 v6",  "ADD", "", c02!(r#","prevResult":{"ip4":{"ip":"fd00::3/64"}}"#),                  E(6, "ip4.ip")),
    r("prevResult legacy route",   "ADD", "", c02!(r#","prevResult":{"ip6":{"ip":"fd00::3/64","routes":[{"dst":"x"}]}}"#), E(6, "ip6.routes[0].dst")),
    // --- verbs too new for the config version (K6, S5, G5) ---
    r("CHECK with 0.3.1",          "CHECK",  "", conf!("0.3.1", ""),       E(1, "config version does not allow CHECK")),
    r("CHECK without cniVersion",  "CHECK",  "", r#"{"name":"net","type":"tern"}"#, E(1, "config version does not allow CHECK")),
    r("GC with 1.0.0",             "GC",     "", C10,                      E(1, "config version does not allow GC")),
    r("STATUS with 0.4.0",         "STATUS", "", conf!("0.4.0", ""),       E(1, "config version does not allow STATUS")),
    // --- GC attachments (G1) ---
    r("valid-attachments object",  "GC", "", c11!(r#","cni.dev/valid-attachments":{}"#),                          E(7, "cni.dev/valid-attachments")),
    r("valid-attachments no ifname","GC","", c11!(r#","cni.dev/valid-attachments":[{"containerID":"c"}]"#),        E(7, "cni.dev/valid-attachments[0]")),
    r("valid-attachments id number","GC","", c11!(r#","cni.dev/valid-attachments":[{"containerID":1,"ifname":"e"}]"#), E(7, "cni.dev/valid-attachments[0].containerID")),
    r("attachments (tag key) bad", "GC", "", c11!(r#","cni.dev/attachments":"all""#),                              E(7, "cni.dev/attachments")),
    // --- environment (E3, E5, I1, I2, CA1) ---
    r("CNI_COMMAND unset",         "",       "",                        C10, E(4, "[CNI_COMMAND]")),
    r("CNI_COMMAND empty",         "",       "CNI_COMMAND=",            C10, E(4, "[CNI_COMMAND]")),
    r("CNI_COMMAND unknown",       "FOO",    "",                        C10, E(4, "unknown CNI_COMMAND: FOO")),
    r("CNI_COMMAND lower case",    "add",    "",                        C10, E(4, "unknown CNI_COMMAND: add")),
    r("ADD containerID unset",     "ADD",    "-CNI_CONTAINERID",        C10, E(3, "CNI_CONTAINERID")),
    r("ADD containerID empty",     "ADD",    "CNI_CONTAINERID=",        C10, E(3, "CNI_CONTAINERID")),
    r("DEL containerID empty",     "DEL",    "CNI_CONTAINERID=",        C10, E(3, "CNI_CONTAINERID")),
    r("CHECK containerID empty",   "CHECK",  "CNI_CONTAINERID=",        C10, E(3, "CNI_CONTAINERID")),
    r("containerID slash",         "ADD",    "CNI_CONTAINERID=bad/id",  C10, E(4, "CNI_CONTAINERID")),
    r("containerID leading dash",  "DEL",    "CNI_CONTAINERID=-bad",    C10, E(4, "CNI_CONTAINERID")),
    r("containerID space",         "ADD",    "CNI_CONTAINERID=a b",     C10, E(4, "CNI_CONTAINERID")),
    r("containerID colon",         "ADD",    "CNI_CONTAINERID=a:b",     C10, E(4, "CNI_CONTAINERID")),
    r("containerID non-ASCII",     "ADD",    "CNI_CONTAINERID=café",    C10, E(4, "CNI_CONTAINERID")),
    r("netns and ifname unset",    "ADD",    "-CNI_NETNS|-CNI_IFNAME",  C10, E(4, "required env variables [CNI_NETNS,CNI_IFNAME] missing")),
    r("ADD netns empty",           "ADD",    "CNI_NETNS=",              C10, E(4, "[CNI_NETNS]")),
    r("CHECK netns empty",         "CHECK",  "CNI_NETNS=",              C10, E(4, "[CNI_NETNS]")),
    r("DEL ifname empty",          "DEL",    "CNI_IFNAME=",             C10, E(4, "[CNI_IFNAME]")),
    r("ifname 16 chars",           "ADD",    "CNI_IFNAME=0123456789abcdef", C10, E(4, "CNI_IFNAME")),
    r("ifname 16 bytes (UTF-8)",   "ADD",    "CNI_IFNAME=ééééééé12",    C10, E(4, "too long")),
    r("ifname .",                  "ADD",    "CNI_IFNAME=.",            C10, E(4, "CNI_IFNAME")),
    r("ifname ..",                 "DEL",    "CNI_IFNAME=..",           C10, E(4, "CNI_IFNAME")),
    r("ifname slash",              "ADD",    "CNI_IFNAME=a/b",          C10, E(4, "CNI_IFNAME")),
    r("ifname colon",              "ADD",    "CNI_IFNAME=eth0:1",       C10, E(4, "CNI_IFNAME")),
    r("ifname space",              "CHECK",  "CNI_IFNAME=eth 0",        C10, E(4, "CNI_IFNAME")),
    r("ifname tab",                "ADD",    "CNI_IFNAME=eth\t0",       C10, E(4, "CNI_IFNAME")),
    r("ifname no-break space",     "ADD",    "CNI_IFNAME=eth\u{a0}0",   C10, E(4, "CNI_IFNAME")),
    r("CNI_ARGS value with =",     "ADD",    "CNI_ARGS=A=b=c",          C10, E(4, "CNI_ARGS")),
    r("CNI_ARGS no =",             "ADD",    "CNI_ARGS=novalue",        C10, E(4, "CNI_ARGS")),
    r("CNI_ARGS empty key",        "DEL",    "CNI_ARGS==v",             C10, E(4, "CNI_ARGS")),
    r("CNI_ARGS second pair bad",  "ADD",    "CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAME", C10, E(4, "CNI_ARGS")),

    // --- accepted ---
    r("minimal 1.0.0 ADD",         "ADD",    "",                        C10, ok("1.0.0")),
    r("cniVersion missing = 0.1.0","ADD",    "",                        r#"{"name":"net","type":"tern"}"#, ok("0.1.0")),
    r("cniVersion empty = 0.1.0",  "DEL",    "",                        conf!("", ""), ok("0.1.0")),
    r("cniVersion null = 0.1.0",   "ADD",    "",                        r#"{"cniVersion":null,"name":"net","type":"tern"}"#, ok("0.1.0")),
    r("every version parses",      "ADD",    "",                        conf!("0.3.0", ""), ok("0.3.0")),
    r("1.1.0 ADD",                 "ADD",    "",                        C11, ok("1.1.0")),
    r("CHECK on 0.4.0",            "CHECK",  "",                        conf!("0.4.0", ""), ok("0.4.0")),
    r("DEL needs no netns",        "DEL",    "-CNI_NETNS",              C10, Want::Ok("1.0.0", del_without_netns)),
    r("DEL empty netns = unset",   "DEL",    "CNI_NETNS=",              C10, Want::Ok("1.0.0", del_without_netns)),
    r("GC empty vars = unset",     "GC",     "CNI_CONTAINERID=|CNI_NETNS=|CNI_IFNAME=|CNI_ARGS=", c11!(r#","cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]"#), Want::Ok("1.1.0", gc_env_empty)),
    r("GC new key wins",           "GC",     "",                        c11!(r#","cni.dev/valid-attachments":[{"containerID":"new","ifname":"e"}],"cni.dev/attachments":[{"containerID":"old","ifname":"e"}]"#), Want::Ok("1.1.0", gc_new_key_wins)),
    r("GC tag key alone",          "GC",     "",                        c11!(r#","cni.dev/attachments":[{"containerID":"old","ifname":"e"}]"#), Want::Ok("1.1.0", gc_old_key)),
    r("GC null new key, old key",  "GC",     "",                        c11!(r#","cni.dev/valid-attachments":null,"cni.dev/attachments":[{"containerID":"old","ifname":"e"}]"#), Want::Ok("1.1.0", gc_old_key)),
    r("GC empty list kept",        "GC",     "",                        c11!(r#","cni.dev/valid-attachments":[]"#), Want::Ok("1.1.0", gc_empty_list)),
    r("GC keys ignored on ADD",    "ADD",    "",                        c11!(r#","cni.dev/valid-attachments":"x""#), Want::Ok("1.1.0", no_attachments)),
    r("STATUS on 1.1.0",           "STATUS", "-CNI_CONTAINERID|-CNI_NETNS|-CNI_IFNAME", C11, ok("1.1.0")),
    r("VERSION needs nothing",     "VERSION","-CNI_CONTAINERID|-CNI_NETNS|-CNI_IFNAME|-CNI_PATH", "", ok("")),
    r("CNI_PATH optional",         "ADD",    "-CNI_PATH",               C10, ok("1.0.0")),
    r("CNI_PATH split on :",       "ADD",    "CNI_PATH=/a::/b",         C10, Want::Ok("1.0.0", path_split)),
    r("CNI_ARGS K8S + trailing ;", "ADD",    "CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAME=p;", C10, Want::Ok("1.0.0", args_parsed)),
    r("ifname 15 chars",           "ADD",    "CNI_IFNAME=0123456789abcde", C10, ok("1.0.0")),
    r("containerID . _ -",         "ADD",    "CNI_CONTAINERID=a1.b_c-d", C10, ok("1.0.0")),
    r("capabilities, unknown keys","ADD",    "",                        c10!(r#","capabilities":{"portMappings":true},"zzz":[1],"runtimeConfig":{"deviceID":"0000:04:00.5"}"#), Want::Ok("1.0.0", keeps_unknown)),
    r("runtimeConfig typed",       "ADD",    "",                        c10!(r#","runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":8080}],"bandwidth":{"ingressRate":8,"ingressBurst":null}}"#), Want::Ok("1.0.0", typed_runtime_config)),
    r("nulls are empty",           "ADD",    "",                        c10!(r#","ipam":null,"dns":{"nameservers":null,"search":null},"runtimeConfig":{"portMappings":null,"ips":null,"mac":null}"#), Want::Ok("1.0.0", null_lists)),
    r("prevResult legacy 0.2.0",   "ADD",    "",                        c02!(r#","prevResult":{"ip4":{"ip":"10.0.0.3/24","routes":[{"dst":"0.0.0.0/0"}]},"ip6":{"ip":"fd00::3/64","routes":[{"dst":"::/0"}]}}"#), Want::Ok("0.2.0", prev_dual_stack)),
    r("prevResult empty gateways", "DEL",    "",                        c10!(r#","prevResult":{"ips":[{"address":"10.0.0.3/24","gateway":""}],"routes":[{"dst":"0.0.0.0/0","gw":null}]}"#), Want::Ok("1.0.0", prev_no_gateway)),
    r("prevResult 0.4.0 in 1.0.0", "CHECK",  "",                        c10!(r#","prevResult":{"cniVersion":"0.4.0","ips":[{"version":"4","address":"10.0.0.3/24"}]}"#), ok("1.0.0")),
];

fn env_map(row: &Row) -> HashMap<String, String> {
    let mut m: HashMap<String, String> = [
        ("CNI_CONTAINERID", "ctr1"),
        ("CNI_NETNS", "/run/netns/t"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    if !row.cmd.is_empty() {
        m.insert("CNI_COMMAND".into(), row.cmd.into());
    }
    for item in row.env.split('|').filter(|s| !s.is_empty()) {
        match item.strip_prefix('-') {
            Some(k) => {
                m.remove(k);
            }
            None => {
                let (k, v) = item.split_once('=').expect("K=V");
                m.insert(k.into(), v.into());
            }
        }
    }
    m
}

/// What the skeleton does before calling a plugin method.
fn skeleton(row: &Row) -> Result<(Env, Option<NetConf>), CniError> {
    let m = env_map(row);
    let env = Env::from_lookup(|k| m.get(k).cloned())?;
    if env.command == Command::Version {
        return Ok((env, None));
    }
    let conf = NetConf::parse(row.stdin.as_bytes(), env.command, &Version::ALL)?;
    Ok((env, Some(conf)))
}

#[test]
fn protocol_table() {
    let mut failures = Vec::new();
    let malformed = PROTOCOL.iter().filter(|r| matches!(r.want, Want::Err(..))).count();
    assert!(malformed >= 45, "only {malformed} malformed rows");
    for row in PROTOCOL {
        let got = skeleton(row);
        let problem = match (row.want, &got) {
            (Want::Ok(v, probe), Ok((env, conf))) => {
                let version = conf.as_ref().map(|c| c.cni_version.as_str()).unwrap_or("");
                if version != v {
                    Some(format!("version {version}, want {v}"))
                } else if !probe(env, conf.as_ref()) {
                    Some("probe failed".to_string())
                } else {
                    None
                }
            }
            (Want::Ok(..), Err(e)) => Some(format!("unexpected error {}", e.to_json())),
            (Want::Err(code, _), Ok(_)) => Some(format!("accepted, want code {code}")),
            (Want::Err(code, needle), Err(e)) => check_error(e, code, needle),
        };
        if let Some(p) = problem {
            failures.push(format!("{:<28} {p}", row.label));
        }
    }
    assert!(failures.is_empty(), "{} rows failed:\n{}", failures.len(), failures.join("\n"));
}

/// Code, wording and the error JSON (SPEC "Error": code, msg, details).
fn check_error(e: &CniError, code: u32, needle: &str) -> Option<String> {
    if e.code != code {
        return Some(format!("code {} ({}), want {code}", e.code, e.msg));
    }
    if !e.msg.contains(needle) {
        return Some(format!("message {:?} does not name {needle:?}", e.msg));
    }
    if e.msg == "incompatible CNI versions"
        && !(e.details.contains("config is") && e.details.contains("plugin supports"))
    {
        return Some(format!("details {:?} lack the versions", e.details));
    }
    let v: Value = serde_json::from_str(&e.to_json()).ok()?;
    if v["code"] != json!(code) || v["msg"] != json!(e.msg) {
        return Some(format!("bad error JSON {v}"));
    }
    None
}

// ---------------------------------------------------------------------------
// 2. Versions (C1-C3).

/// input, parsed version or code, CHECK allowed, GC/STATUS allowed, legacy result shape
type VersionRow = (Option<&'static str>, Result<&'static str, u32>, bool, bool, bool);

#[rustfmt::skip]
const VERSIONS: &[VersionRow] = &[
    // input,           parsed,        CHECK, GC/STATUS, legacy result
    (None,              Ok("0.1.0"),   false, false, true),
    (Some(""),          Ok("0.1.0"),   false, false, true),
    (Some("0.1.0"),     Ok("0.1.0"),   false, false, true),
    (Some("0.2.0"),     Ok("0.2.0"),   false, false, true),
    (Some("0.3.0"),     Ok("0.3.0"),   false, false, false),
    (Some("0.3.1"),     Ok("0.3.1"),   false, false, false),
    (Some("0.4.0"),     Ok("0.4.0"),   true,  false, false),
    (Some("1.0.0"),     Ok("1.0.0"),   true,  false, false),
    (Some("1.1.0"),     Ok("1.1.0"),   true,  true,  false),
    (Some("1.2.0"),     Err(1),        false, false, false),
    (Some("0.0.1"),     Err(1),        false, false, false),
    (Some("01.0.0"),    Err(1),        false, false, false),
    (Some("1.0"),       Err(6),        false, false, false),
    (Some("1.0.0-rc1"), Err(6),        false, false, false),
    (Some(" 1.0.0"),    Err(6),        false, false, false),
    (Some("latest"),    Err(6),        false, false, false),
];

#[test]
fn version_table() {
    for &(input, want, check, gc, legacy) in VERSIONS {
        match (Version::parse_or_default(input), want) {
            (Ok(v), Ok(w)) => {
                assert_eq!(v.as_str(), w, "{input:?}");
                assert_eq!(
                    (v.supports_check(), v.supports_gc_and_status(), v.is_legacy_result()),
                    (check, gc, legacy),
                    "{input:?}"
                );
                assert_eq!(v.has_prev_result_on_del(), check, "{input:?}: DEL prevResult from 0.4.0");
            }
            (Err(e), Err(code)) => assert_eq!(e.code, code, "{input:?}: {}", e.msg),
            (got, want) => panic!("{input:?}: got {got:?}, want {want:?}"),
        }
    }
    assert_eq!(Version::ALL.len(), 7);
    assert_eq!(Version::LATEST, *Version::ALL.last().unwrap());
    assert!(Version::ALL.windows(2).all(|w| w[0] < w[1]));
}

/// cniVersion, cniVersions, chosen version or code
type SelectRow = (Option<&'static str>, &'static [&'static str], Result<&'static str, u32>);

#[rustfmt::skip]
const SELECT: &[SelectRow] = &[
    // cniVersion,    cniVersions,                         chosen
    (Some("1.0.0"),   &[],                                 Ok("1.0.0")),
    (None,            &[],                                 Ok("0.1.0")),
    (Some(""),        &[],                                 Ok("0.1.0")),
    (Some("0.4.0"),   &["1.0.0", "1.1.0"],                 Ok("1.1.0")),
    (Some("1.1.0"),   &["0.3.1"],                          Ok("1.1.0")),
    (None,            &["0.3.1", "1.0.0"],                 Ok("1.0.0")),
    (Some(""),        &["0.4.0"],                          Ok("0.4.0")),
    (Some("1.0.0"),   &["1.1.0", "1.2.0", "2.0.0"],        Ok("1.1.0")),
    (Some("1.5.0"),   &["1.0.0"],                          Ok("1.0.0")),
    (Some("0.4.0"),   &["1.0.1"],                          Ok("0.4.0")),
    (Some("2.0.0"),   &[],                                 Err(1)),
    (None,            &["3.0.0"],                          Err(1)),
    (Some("1.0.0"),   &["one"],                            Err(6)),
    (Some("x"),       &["1.0.0"],                          Err(6)),
];

#[test]
fn select_version_table() {
    for &(single, list, want) in SELECT {
        let list: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        match (select_version(single, &list), want) {
            (Ok(v), Ok(w)) => assert_eq!(v.as_str(), w, "{single:?} {list:?}"),
            (Err(e), Err(code)) => assert_eq!(e.code, code, "{single:?} {list:?}: {}", e.msg),
            (got, want) => panic!("{single:?} {list:?}: got {got:?}, want {want:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// 3. Result conversions (C5, C6, 1.8): parse `input` (falling back to
//    `fallback` without cniVersion), render in `to`.

struct Conv {
    label: &'static str,
    input: &'static str,
    fallback: &'static str,
    to: &'static str,
    lossy: bool,
    want: Result<&'static str, u32>,
}
const fn cv(
    label: &'static str,
    input: &'static str,
    fallback: &'static str,
    to: &'static str,
    want: Result<&'static str, u32>,
) -> Conv {
    Conv { label, input, fallback, to, lossy: false, want }
}
const fn lossy(label: &'static str, input: &'static str, to: &'static str, want: &'static str) -> Conv {
    Conv { label, input, fallback: "1.0.0", to, lossy: true, want: Ok(want) }
}

#[rustfmt::skip]
const CONVERSIONS: &[Conv] = &[
    cv("1.1 fields dropped for 1.0", r#"{"cniVersion":"1.1.0","interfaces":[{"name":"eth0","mtu":1400,"socketPath":"/s","pciID":"0000:01:00.0","sandbox":"/n"}],"routes":[{"dst":"0.0.0.0/0","mtu":1300,"advmss":1200,"priority":5,"table":100,"scope":0}]}"#, "", "1.0.0",
       Ok(r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/n"}],"routes":[{"dst":"0.0.0.0/0"}],"dns":{}}"#)),
    cv("1.1 fields kept for 1.1",    r#"{"cniVersion":"1.1.0","interfaces":[{"name":"eth0","mtu":1400,"socketPath":"/s","pciID":"p"}],"routes":[{"dst":"0.0.0.0/0","scope":0,"table":100}]}"#, "", "1.1.0",
       Ok(r#"{"cniVersion":"1.1.0","interfaces":[{"name":"eth0","mtu":1400,"socketPath":"/s","pciID":"p"}],"routes":[{"dst":"0.0.0.0/0","scope":0,"table":100}],"dns":{}}"#)),
    cv("1.1 fields dropped for 0.4", r#"{"cniVersion":"1.1.0","interfaces":[{"name":"eth0","mtu":1400}],"routes":[{"dst":"::/0","priority":1}]}"#, "", "0.4.0",
       Ok(r#"{"cniVersion":"0.4.0","interfaces":[{"name":"eth0"}],"routes":[{"dst":"::/0"}],"dns":{}}"#)),
    cv("1.0 -> 0.4 adds version",    r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],"ips":[{"address":"10.1.0.2/24","interface":0},{"address":"fd00::2/64","gateway":"fd00::1"}]}"#, "", "0.4.0",
       Ok(r#"{"cniVersion":"0.4.0","interfaces":[{"name":"eth0"}],"ips":[{"version":"4","address":"10.1.0.2/24","interface":0},{"version":"6","address":"fd00::2/64","gateway":"fd00::1"}],"dns":{}}"#)),
    cv("1.0 -> 0.3.0 adds version",  r#"{"cniVersion":"1.0.0","ips":[{"address":"10.1.0.2/24"}]}"#, "", "0.3.0",
       Ok(r#"{"cniVersion":"0.3.0","ips":[{"version":"4","address":"10.1.0.2/24"}],"dns":{}}"#)),
    cv("0.4 -> 1.0 drops version",   r#"{"cniVersion":"0.4.0","ips":[{"version":"6","address":"fd00::2/64"}],"dns":{"nameservers":["fd00::53"]}}"#, "", "1.0.0",
       Ok(r#"{"cniVersion":"1.0.0","ips":[{"address":"fd00::2/64"}],"dns":{"nameservers":["fd00::53"]}}"#)),
    cv("0.3.1 -> 0.2.0 per family",  r#"{"cniVersion":"0.3.1","interfaces":[{"name":"eth0"}],"ips":[{"version":"4","address":"10.1.0.2/24","gateway":"10.1.0.1","interface":0},{"version":"6","address":"fd00::2/64"}],"routes":[{"dst":"0.0.0.0/0"},{"dst":"fd01::/64","gw":"fd00::1"},{"dst":"10.9.0.0/16","gw":"10.1.0.9"}]}"#, "", "0.2.0",
       Ok(r#"{"cniVersion":"0.2.0","ip4":{"ip":"10.1.0.2/24","gateway":"10.1.0.1","routes":[{"dst":"0.0.0.0/0"},{"dst":"10.9.0.0/16","gw":"10.1.0.9"}]},"ip6":{"ip":"fd00::2/64","routes":[{"dst":"fd01::/64","gw":"fd00::1"}]},"dns":{}}"#)),
    cv("0.2.0 -> 1.0 ips + routes",  r#"{"cniVersion":"0.2.0","ip4":{"ip":"10.1.0.2/24","gateway":"10.1.0.1","routes":[{"dst":"0.0.0.0/0"}]},"ip6":{"ip":"fd00::2/64","routes":[{"dst":"::/0","gw":"fd00::1"}]},"dns":{"domain":"x"}}"#, "", "1.0.0",
       Ok(r#"{"cniVersion":"1.0.0","ips":[{"address":"10.1.0.2/24","gateway":"10.1.0.1"},{"address":"fd00::2/64"}],"routes":[{"dst":"0.0.0.0/0"},{"dst":"::/0","gw":"fd00::1"}],"dns":{"domain":"x"}}"#)),
    cv("0.1.0 -> 0.3.1",             r#"{"cniVersion":"0.1.0","ip6":{"ip":"fd00::2/64"}}"#, "", "0.3.1",
       Ok(r#"{"cniVersion":"0.3.1","ips":[{"version":"6","address":"fd00::2/64"}],"dns":{}}"#)),
    cv("0.2.0 -> 0.1.0",             r#"{"cniVersion":"0.2.0","ip4":{"ip":"10.1.0.2/24"}}"#, "", "0.1.0",
       Ok(r#"{"cniVersion":"0.1.0","ip4":{"ip":"10.1.0.2/24"},"dns":{}}"#)),
    cv("no cniVersion: fallback 0.2", r#"{"ip4":{"ip":"10.1.0.2/24","gateway":"10.1.0.1"}}"#, "0.2.0", "1.0.0",
       Ok(r#"{"cniVersion":"1.0.0","ips":[{"address":"10.1.0.2/24","gateway":"10.1.0.1"}],"dns":{}}"#)),
    cv("empty cniVersion: fallback", r#"{"cniVersion":"","ips":[{"address":"10.1.0.2/24"}]}"#, "1.0.0", "1.1.0",
       Ok(r#"{"cniVersion":"1.1.0","ips":[{"address":"10.1.0.2/24"}],"dns":{}}"#)),
    cv("legacy keys in 1.0 ignored", r#"{"cniVersion":"1.0.0","ip4":{"ip":"10.1.0.2/24"}}"#, "", "1.0.0",
       Ok(r#"{"cniVersion":"1.0.0","dns":{}}"#)),
    cv("v6 route w/o v6 ip dropped", r#"{"cniVersion":"1.0.0","ips":[{"address":"10.1.0.2/24"}],"routes":[{"dst":"::/0"},{"dst":"0.0.0.0/0"}]}"#, "", "0.2.0",
       Ok(r#"{"cniVersion":"0.2.0","ip4":{"ip":"10.1.0.2/24","routes":[{"dst":"0.0.0.0/0"}]},"dns":{}}"#)),
    cv("no ips -> 0.2.0",            r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}]}"#, "", "0.2.0",
       Ok(r#"{"cniVersion":"0.2.0","dns":{}}"#)),
    cv("empty gateway strings",      r#"{"cniVersion":"1.0.0","ips":[{"address":"10.1.0.2/24","gateway":""}],"routes":[{"dst":"0.0.0.0/0","gw":""}]}"#, "", "1.0.0",
       Ok(r#"{"cniVersion":"1.0.0","ips":[{"address":"10.1.0.2/24"}],"routes":[{"dst":"0.0.0.0/0"}],"dns":{}}"#)),
    cv("nulls tolerated",            r#"{"cniVersion":"1.0.0","interfaces":null,"ips":null,"routes":null,"dns":null}"#, "", "0.4.0",
       Ok(r#"{"cniVersion":"0.4.0","dns":{}}"#)),
    cv("host bits kept",             r#"{"cniVersion":"1.0.0","ips":[{"address":"10.1.0.77/8"}],"routes":[{"dst":"10.1.0.0/16"}]}"#, "", "1.0.0",
       Ok(r#"{"cniVersion":"1.0.0","ips":[{"address":"10.1.0.77/8"}],"routes":[{"dst":"10.1.0.0/16"}],"dns":{}}"#)),
    cv("zero mtu omitted",           r#"{"cniVersion":"1.1.0","interfaces":[{"name":"eth0","mtu":0}]}"#, "", "1.1.0",
       Ok(r#"{"cniVersion":"1.1.0","interfaces":[{"name":"eth0"}],"dns":{}}"#)),
    cv("two IPv4 -> 0.2.0 refused",  r#"{"cniVersion":"1.0.0","ips":[{"address":"10.1.0.2/24"},{"address":"10.2.0.2/24"}]}"#, "", "0.2.0", Err(1)),
    cv("two IPv6 -> 0.1.0 refused",  r#"{"cniVersion":"1.0.0","ips":[{"address":"fd00::2/64"},{"address":"fd01::2/64"}]}"#, "", "0.1.0", Err(1)),
    cv("iface index out of range",   r#"{"cniVersion":"1.0.0","interfaces":[{"name":"a"}],"ips":[{"address":"10.1.0.2/24","interface":1}]}"#, "", "1.0.0", Err(6)),
    cv("iface index in 0.3.1",       r#"{"cniVersion":"0.3.1","ips":[{"version":"4","address":"10.1.0.2/24","interface":0}]}"#, "", "1.0.0", Err(6)),
    cv("unknown result version",     r#"{"cniVersion":"0.5.0"}"#, "", "1.0.0", Err(1)),
    cv("cniVersion not a string",    r#"{"cniVersion":1.0}"#, "", "1.0.0", Err(6)),
    cv("result not an object",       r#"[]"#, "1.0.0", "1.0.0", Err(6)),
    cv("ip4 holding IPv6",           r#"{"cniVersion":"0.2.0","ip4":{"ip":"fd00::2/64"}}"#, "", "1.0.0", Err(6)),
    cv("ip4 not an object",          r#"{"cniVersion":"0.2.0","ip4":"10.1.0.2/24"}"#, "", "1.0.0", Err(6)),
    lossy("lossy: first per family", r#"{"cniVersion":"1.0.0","ips":[{"address":"10.1.0.2/24"},{"address":"10.2.0.2/24"},{"address":"fd00::2/64"}]}"#, "0.2.0",
       r#"{"cniVersion":"0.2.0","ip4":{"ip":"10.1.0.2/24"},"ip6":{"ip":"fd00::2/64"},"dns":{}}"#),
];

#[test]
fn conversion_table() {
    let version = |s: &str| Version::parse_or_default(Some(s)).unwrap();
    for c in CONVERSIONS {
        let input: Value = serde_json::from_str(c.input).unwrap_or_else(|e| panic!("{}: bad input JSON: {e}", c.label));
        let fallback = if c.fallback.is_empty() { Version::V0_1_0 } else { version(c.fallback) };
        let to = version(c.to);
        let got = CniResult::from_value(&input, fallback).and_then(|r| {
            if c.lossy {
                Ok(r.to_value_lossy(to))
            } else {
                r.to_value(to)
            }
        });
        match (got, c.want) {
            (Ok(v), Ok(w)) => {
                let w: Value = serde_json::from_str(w).unwrap_or_else(|e| panic!("{}: bad want JSON: {e}", c.label));
                assert_eq!(v, w, "{}", c.label);
                // What we print we can read back, unchanged.
                let again = CniResult::from_value(&v, Version::V0_1_0).unwrap().to_value_lossy(to);
                assert_eq!(again, v, "{}: not stable", c.label);
            }
            (Err(e), Err(code)) => assert_eq!(e.code, code, "{}: {}", c.label, e.msg),
            (got, want) => panic!("{}: got {got:?}, want {want:?}", c.label),
        }
    }
}

#[test]
fn invalid_interface_index_is_not_printed() {
    let mut r =
        CniResult::from_value(&json!({"cniVersion":"1.0.0","ips":[{"address":"10.1.0.2/24"}]}), Version::V1_0_0)
            .unwrap();
    r.ips[0].interface = Some(0);
    assert_eq!(r.to_value(Version::V1_0_0).unwrap_err().code, 999);
    // Before 0.3.0 the index is not part of the result, so nothing to check.
    assert!(r.to_value(Version::V0_2_0).is_ok());
}

#[test]
fn route_gateway_falls_back_to_family_gateway() {
    let r = CniResult::from_value(
        &json!({"cniVersion":"1.0.0","ips":[{"address":"10.1.0.2/24","gateway":"10.1.0.1"},{"address":"fd00::2/64","gateway":"fd00::1"}],
                "routes":[{"dst":"0.0.0.0/0"},{"dst":"::/0"},{"dst":"10.9.0.0/16","gw":"10.1.0.9"}]}),
        Version::V1_0_0,
    )
    .unwrap();
    let gws: Vec<String> = r.routes.iter().map(|rt| r.route_gateway(rt).unwrap().to_string()).collect();
    assert_eq!(gws, ["10.1.0.1", "fd00::1", "10.1.0.9"]);
}

// ---------------------------------------------------------------------------
// 4. Identifier rules (N2, I1, I2, P1): 0 = valid.

#[rustfmt::skip]
const IDENTIFIERS: &[(&str, &str, u32)] = &[
    ("container", "abc",                   0),
    ("container", "0a.b_c-d",              0),
    ("container", "A",                     0),
    ("container", "",                      3),
    ("container", "-bad",                  4),
    ("container", "_bad",                  4),
    ("container", ".bad",                  4),
    ("container", "bad/id",                4),
    ("container", "a b",                   4),
    ("container", "a:b",                   4),
    ("container", "a\\b",                  4),
    ("ifname",    "eth0",                  0),
    ("ifname",    "0123456789abcde",       0),
    ("ifname",    "vlan.100",              0),
    ("ifname",    "...",                   0),
    ("ifname",    "",                      4),
    ("ifname",    "0123456789abcdef",      4),
    ("ifname",    ".",                     4),
    ("ifname",    "..",                    4),
    ("ifname",    "a/b",                   4),
    ("ifname",    "a:b",                   4),
    ("ifname",    " eth0",                 4),
    ("ifname",    "eth0\n",                4),
    ("network",   "net",                   0),
    ("network",   "k8s-pod-network.v1_2",  0),
    ("network",   "",                      7),
    ("network",   "bad name",              7),
    ("network",   ".hidden",               7),
    ("network",   "a/b",                   7),
    ("network",   "a\\b",                  7),
    ("type",      "host-local",            0),
    ("type",      "",                      7),
    ("type",      ".",                     7),
    ("type",      "..",                    7),
    ("type",      "/usr/bin/x",            7),
    ("type",      "a\\b",                  7),
];

#[test]
fn identifier_table() {
    for &(kind, input, want) in IDENTIFIERS {
        let got = match kind {
            "container" => validate::container_id(input),
            "ifname" => validate::interface_name(input),
            "network" => validate::network_name(input),
            "type" => validate::plugin_type(input, "type"),
            _ => unreachable!(),
        };
        assert_eq!(got.map_err(|e| e.code).err().unwrap_or(0), want, "{kind} {input:?}");
    }
}

// ---------------------------------------------------------------------------
// 5. CNI_ARGS strictness (CA1, CA2): known keys, expected code (0 = accepted).

#[rustfmt::skip]
const CNI_ARGS: &[(&str, &[&str], u32)] = &[
    ("IP=10.0.0.5",                          &["IP"], 0),
    ("",                                     &[],     0),
    ("FOO=1",                                &["IP"], 4),
    ("ip=10.0.0.5",                          &["IP"], 4),
    ("FOO=1;IgnoreUnknown=1",                &[],     0),
    ("FOO=1;IgnoreUnknown=TRUE",             &[],     0),
    ("FOO=1;IgnoreUnknown=0",                &[],     4),
    ("FOO=1;IgnoreUnknown=false",            &[],     4),
    ("IgnoreUnknown=yes",                    &[],     4),
    ("K8S_POD_NAME=p;K8S_POD_NAMESPACE=n",   &[],     0),
];

#[test]
fn cni_args_table() {
    for &(s, known, want) in CNI_ARGS {
        let got = CniArgs::parse(s).and_then(|a| a.check_known(known));
        assert_eq!(got.as_ref().map_err(|e| e.code).err().unwrap_or(0), want, "{s:?}: {got:?}");
        if let Err(e) = got {
            assert!(e.msg.contains("CNI_ARGS"), "{s:?}: {}", e.msg);
        }
    }
}

// ---------------------------------------------------------------------------
// 6. Network configuration lists (N1-N5, N7, 2.1).

/// label, single-plugin .conf?, bytes, chosen version or (code, field named in the message)
type ConflistRow = (&'static str, bool, &'static str, Result<&'static str, (u32, &'static str)>);

#[rustfmt::skip]
const CONFLISTS: &[ConflistRow] = &[
    // label,                 single .conf?, bytes,                                                                  chosen version or (code, field)
    ("minimal",               false, r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"}]}"#,          Ok("1.0.0")),
    ("cniVersions highest",   false, r#"{"cniVersion":"0.4.0","cniVersions":["1.0.0","1.1.0","9.0.0"],"name":"n","plugins":[{"type":"b"}]}"#, Ok("1.1.0")),
    ("no cniVersion",         false, r#"{"name":"n","plugins":[{"type":"b"}]}"#,                                     Ok("0.1.0")),
    ("disable flags strings", false, r#"{"cniVersion":"1.1.0","name":"n","disableCheck":"True","disableGC":"false","plugins":[{"type":"b"}]}"#, Ok("1.1.0")),
    ("capabilities ok",       false, r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"portmap","capabilities":{"portMappings":true}}]}"#, Ok("1.0.0")),
    ("single conf",           true,  r#"{"cniVersion":"0.3.1","name":"n","type":"bridge","ipam":{}}"#,               Ok("0.3.1")),
    ("not JSON",              false, r#"{"#,                                                                        Err((6, "error parsing configuration list"))),
    ("array",                 false, r#"[]"#,                                                                       Err((6, "not a JSON object"))),
    ("name missing",          false, r#"{"cniVersion":"1.0.0","plugins":[{"type":"b"}]}"#,                           Err((7, "name"))),
    ("name invalid",          false, r#"{"cniVersion":"1.0.0","name":"a b","plugins":[{"type":"b"}]}"#,              Err((7, "name"))),
    ("name number",           false, r#"{"cniVersion":"1.0.0","name":1,"plugins":[{"type":"b"}]}"#,                  Err((7, "name"))),
    ("cniVersion number",     false, r#"{"cniVersion":1,"name":"n","plugins":[{"type":"b"}]}"#,                      Err((7, "cniVersion"))),
    ("cniVersion unknown",    false, r#"{"cniVersion":"2.0.0","name":"n","plugins":[{"type":"b"}]}"#,                Err((1, "cniVersion"))),
    ("cniVersions string",    false, r#"{"cniVersions":"1.0.0","name":"n","plugins":[{"type":"b"}]}"#,               Err((7, "cniVersions"))),
    ("cniVersions[1] number", false, r#"{"cniVersions":["1.0.0",1],"name":"n","plugins":[{"type":"b"}]}"#,           Err((7, "cniVersions[1]"))),
    ("cniVersions garbage",   false, r#"{"cniVersions":["1.0.0","new"],"name":"n","plugins":[{"type":"b"}]}"#,       Err((6, "cniVersions[1]"))),
    ("disableCheck yes",      false, r#"{"name":"n","disableCheck":"yes","plugins":[{"type":"b"}]}"#,               Err((7, "disableCheck"))),
    ("disableGC number",      false, r#"{"name":"n","disableGC":1,"plugins":[{"type":"b"}]}"#,                       Err((7, "disableGC"))),
    ("plugins missing",       false, r#"{"cniVersion":"1.0.0","name":"n"}"#,                                         Err((7, "plugins"))),
    ("plugins empty",         false, r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#,                            Err((7, "plugins"))),
    ("plugins object",        false, r#"{"cniVersion":"1.0.0","name":"n","plugins":{"type":"b"}}"#,                  Err((7, "plugins"))),
    ("plugin not object",     false, r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"b"},"c"]}"#,            Err((7, "plugins[1]"))),
    ("plugin type missing",   false, r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"b"},{}]}"#,             Err((7, "plugins[1].type"))),
    ("plugin type path",      false, r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"/bin/b"}]}"#,           Err((7, "plugins[0].type"))),
    ("plugin type backslash", false, r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"..\\b"}]}"#,            Err((7, "plugins[0].type"))),
    ("plugin type number",    false, r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":3}]}"#,                  Err((7, "plugins[0].type"))),
    ("capability not bool",   false, r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"b","capabilities":{"mac":"yes"}}]}"#, Err((7, "plugins[0].capabilities.mac"))),
    ("single conf no type",   true,  r#"{"cniVersion":"1.0.0","name":"n"}"#,                                         Err((7, "type"))),
    ("single conf no name",   true,  r#"{"cniVersion":"1.0.0","type":"bridge"}"#,                                    Err((7, "name"))),
    ("single conf not JSON",  true,  r#"nope"#,                                                                     Err((6, "error parsing configuration"))),
];

#[test]
fn conflist_table() {
    for &(label, single, bytes, want) in CONFLISTS {
        let got =
            if single { NetConfList::from_single_conf(bytes.as_bytes()) } else { NetConfList::parse(bytes.as_bytes()) };
        match (got, want) {
            (Ok(l), Ok(v)) => {
                assert_eq!(l.cni_version.as_str(), v, "{label}");
                if !single {
                    assert_eq!(l.raw_bytes, bytes.as_bytes(), "{label}: raw bytes kept");
                }
            }
            (Err(e), Err((code, needle))) => {
                assert_eq!(e.code, code, "{label}: {}", e.msg);
                assert!(e.msg.contains(needle), "{label}: {:?} does not name {needle:?}", e.msg);
            }
            (got, want) => panic!("{label}: got {got:?}, want {want:?}"),
        }
    }
    let l = NetConfList::parse(CONFLISTS[3].2.as_bytes()).unwrap();
    assert!(l.disable_check && !l.disable_gc);
}

#[test]
fn plugin_requests_follow_r8_r9() {
    let list = NetConfList::parse(
        br#"{"cniVersion":"0.4.0","cniVersions":["1.0.0"],"name":"net","plugins":[
            {"type":"bridge","name":"ignored","cniVersion":"0.1.0","ipam":{"type":"host-local"}},
            {"type":"tuning","capabilities":{"mac":true,"bandwidth":true,"ips":false},"cni.dev/valid-attachments":[],"x":{"y":1}}]}"#,
    )
    .unwrap();
    let rc: Map<String, Value> =
        serde_json::from_value(json!({"mac":"c2:11:22:33:44:55","ips":["10.0.0.9"],"portMappings":[]})).unwrap();
    let prev = CniResult::from_value(&json!({"cniVersion":"1.0.0","ips":[{"address":"10.0.0.9/24"}]}), Version::V1_0_0)
        .unwrap();

    // First ADD: no prevResult; no declared capability, so no runtimeConfig.
    let first: Value = serde_json::from_slice(&list.plugin_request(0, &rc, None)).unwrap();
    assert_eq!(first, json!({"type":"bridge","name":"net","cniVersion":"1.0.0","ipam":{"type":"host-local"}}));

    // Later plugin: only the declared-true capability the runtime supplied;
    // prevResult in the list's version; capabilities and unknown keys kept;
    // cni.dev/* stripped.
    let second: Value = serde_json::from_slice(&list.plugin_request(1, &rc, Some(&prev))).unwrap();
    assert_eq!(
        second,
        json!({"type":"tuning","capabilities":{"mac":true,"bandwidth":true,"ips":false},"x":{"y":1},"cniVersion":"1.0.0","name":"net",
               "runtimeConfig":{"mac":"c2:11:22:33:44:55"},"prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.0.0.9/24"}],"dns":{}}})
    );
    // The request parses as the plugin would see it.
    let conf = NetConf::parse(&list.plugin_request(1, &rc, Some(&prev)), Command::Del, &Version::ALL).unwrap();
    assert_eq!(conf.runtime_config.mac.as_deref(), Some("c2:11:22:33:44:55"));
    assert_eq!(conf.prev_result, Some(prev));
}
