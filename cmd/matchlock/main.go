// Command matchlock runs AI-agent code in ephemeral micro-VMs.
package main

import "matchlock.dev/matchlock/internal/cli"

func main() { cli.Run() }
