//! Points `include_bytes_aligned!` at the test and benchmark XDP object that `lb-daemon`'s
//! build script leaves next to the production one.
fn main() {
    println!("cargo::rerun-if-env-changed=DEP_LB_XDP_TEST_OBJECT");
    match std::env::var("DEP_LB_XDP_TEST_OBJECT") {
        Ok(path) => println!("cargo::rustc-env=LB_XDP_TEST_OBJECT={path}"),
        Err(_) => {
            eprintln!("DEP_LB_XDP_TEST_OBJECT is not set: lb-daemon's build script did not run");
            std::process::exit(1);
        }
    }
}
