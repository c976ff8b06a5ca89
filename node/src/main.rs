use std::process::ExitCode;

use clap::Parser;
use volumed_csi::plugin_main::PluginMain;
use volumed_csi_node::Args;

fn main() -> ExitCode {
    let args = Args::parse();
    PluginMain {
        name: "csi-node",
        config: args.validate(),
        check_config: args.check_config,
        log_format: |c| c.log_format,
        describe: |c| (c.endpoint.to_string(), c.driver_name.clone()),
    }
    .run(volumed_csi_node::run)
}
