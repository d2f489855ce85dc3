// Command matchlock-guest is the guest agent: PID 1 of every matchlock VM.
// It is built statically (CGO_ENABLED=0) and packed into the initramfs by
// the host; it is not meant to be run by hand.
package main

import "matchlock.dev/matchlock/guest/agent"

func main() { agent.Main() }
