package rpc

import (
	"context"
	"io"
	"os"
	"syscall"

	"matchlock.dev/matchlock/sandbox"
)

// Sandbox is what the server needs of a running sandbox. *sandbox.Sandbox
// provides it through vmSandbox; tests use an in-process fake.
type Sandbox interface {
	ID() string
	ImageConfig() sandbox.ImageConfig
	Exec(ctx context.Context, o sandbox.ExecOptions) (Process, error)
	WriteFile(ctx context.Context, path string, r io.Reader, mode os.FileMode) (int64, error)
	ReadFile(ctx context.Context, path string, w io.Writer) (int64, error)
	ListFiles(ctx context.Context, path string) ([]sandbox.FileInfo, error)
	// Done is closed when the VM has exited (for any reason).
	Done() <-chan struct{}
	Close() error
}

// Process is a running guest process; *sandbox.Process satisfies it.
type Process interface {
	Stdout() io.Reader
	Stderr() io.Reader
	Stdin() io.WriteCloser
	Signal(sig syscall.Signal) error
	Resize(rows, cols uint16) error
	Wait(ctx context.Context) (sandbox.ExitStatus, error)
	Close() error
}

// Optional capabilities. The server looks for them on the Sandbox value at
// run time and answers CodeNotSupported without them. *sandbox.Sandbox has
// them all (promoted through vmSandbox); the test fake has none.
type (
	// allowLister changes a running sandbox's egress allow-list.
	allowLister interface {
		AllowHosts(patterns ...string) error
		DenyHosts(patterns ...string) error
		AllowList() (allow, private []string, err error)
	}
	// publisher forwards a host TCP port to a guest port for the
	// sandbox's lifetime.
	publisher interface {
		Publish(spec sandbox.PortSpec) (*sandbox.Forward, error)
	}
)

var (
	_ allowLister = (*sandbox.Sandbox)(nil)
	_ publisher   = (*sandbox.Sandbox)(nil)
)

var (
	_ Process = (*sandbox.Process)(nil)
	_ Sandbox = vmSandbox{}
)

// vmSandbox adapts *sandbox.Sandbox. Embedding promotes any optional
// capability the library adds (Policy, ForwardPort, ...).
type vmSandbox struct{ *sandbox.Sandbox }

func (v vmSandbox) ID() string                       { return v.Sandbox.ID }
func (v vmSandbox) ImageConfig() sandbox.ImageConfig { return v.Sandbox.Image }

func (v vmSandbox) Exec(ctx context.Context, o sandbox.ExecOptions) (Process, error) {
	p, err := v.Sandbox.Exec(ctx, o)
	if err != nil {
		return nil, err
	}
	return p, nil
}

func bootVM(ctx context.Context, o sandbox.Options) (Sandbox, error) {
	sb, err := sandbox.New(ctx, o)
	if err != nil {
		return nil, err
	}
	return vmSandbox{sb}, nil
}
