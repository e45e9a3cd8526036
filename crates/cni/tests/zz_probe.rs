use tern_cni::*;
#[test]
fn probe() {
    for s in [
        r#"{"cniVersion":"1.0.0","name":"n","type":"t","runtimeConfig":{"ips":"x"}}"#,
        r#"{"cniVersion":"1.0.0","name":"n","type":"t","runtimeConfig":{"portMappings":[{"hostPort":"x","containerPort":1}]}}"#,
        r#"{"cniVersion":"1.0.0","name":"n","type":"t","runtimeConfig":{"portMappings":null}}"#,
        r#"{"cniVersion":"1.0.0","name":"n","type":"t","dns":{"nameservers":"x"}}"#,
        r#"{"cniVersion":"1.0.0","name":"n","type":"t","prevResult":{"ips":[{"address":"x"}]}}"#,
    ] {
        println!("{:?}", NetConf::parse(s.as_bytes(), Command::Add, &Version::ALL).err());
    }
}
