"""The world around the daemon: scenes, payload camera, bus, uplink, downlink, reports.
Starts `onboard` as a separate process; never imports it."""
