// Package cli implements the matchlock command line: flag parsing, output
// formatting and exit codes. Nothing algorithmic lives here; every command is
// a thin face over the sandbox, image and state libraries.
package cli

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"
)

// ExitError carries a process exit code out of a command. Commands return it
// when the exit status is meaningful (the guest's exit code, 124 on timeout)
// rather than a plain failure.
type ExitError struct {
	Code int
	Err  error // optional message printed to stderr before exiting
}

func (e *ExitError) Error() string {
	if e.Err != nil {
		return e.Err.Error()
	}
	return fmt.Sprintf("exit status %d", e.Code)
}

func (e *ExitError) Unwrap() error { return e.Err }

// registry of subcommand constructors, filled by init functions in this
// package so that each command lives in its own file.
var commands []func() *cobra.Command

func register(f func() *cobra.Command) { commands = append(commands, f) }

// NewRoot builds the root command with every registered subcommand.
func NewRoot() *cobra.Command {
	root := &cobra.Command{
		Use:           "matchlock",
		Short:         "Run AI-agent code in ephemeral micro-VMs",
		Long:          "matchlock runs commands in throwaway micro-VMs booted from OCI images,\nwith a sealed network and secrets that never enter the VM.",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.CompletionOptions.DisableDefaultCmd = true
	for _, f := range commands {
		root.AddCommand(f())
	}
	return root
}

// Main runs the CLI and returns the process exit code.
func Main(args []string, stderr io.Writer) int {
	root := NewRoot()
	root.SetArgs(args)
	err := root.Execute()
	if err == nil {
		return 0
	}
	var ee *ExitError
	if errors.As(err, &ee) {
		if ee.Err != nil {
			fmt.Fprintf(stderr, "matchlock: %v\n", ee.Err)
		}
		return ee.Code
	}
	fmt.Fprintf(stderr, "matchlock: %v\n", err)
	return 1
}

// Run is the entry point used by cmd/matchlock.
func Run() { os.Exit(Main(os.Args[1:], os.Stderr)) }
