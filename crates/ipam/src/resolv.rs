//! `resolvConf` parsing (the caller reads the file), as host-local's dns.go:
//! `nameserver`, `domain`, `search` and `options` lines; comments (`#`, `;`)
//! and lines without a value are skipped.
use tern_cni::Dns;

pub fn parse_resolv_conf(text: &str) -> Dns {
    let mut dns = Dns::default();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 2 {
            continue;
        }
        let rest = fields[1..].iter().map(|s| s.to_string());
        match fields[0] {
            "nameserver" => dns.nameservers.push(fields[1].to_string()),
            "domain" => dns.domain = fields[1].to_string(),
            "search" => dns.search.extend(rest),
            "options" => dns.options.extend(rest),
            _ => {}
        }
    }
    dns
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_four_keys() {
        let d = parse_resolv_conf(
            "# comment\n; other\nnameserver 10.0.0.10\nnameserver fd00::10 ignored\ndomain example.com\n\
             search a.example b.example\noptions ndots:5 edns0\nsortlist 1.2.3.4\nsearch\n",
        );
        assert_eq!(d.nameservers, ["10.0.0.10", "fd00::10"]);
        assert_eq!(d.domain, "example.com");
        assert_eq!(d.search, ["a.example", "b.example"]);
        assert_eq!(d.options, ["ndots:5", "edns0"]);
        assert!(parse_resolv_conf("").is_empty());
    }
}
