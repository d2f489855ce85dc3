package sdk

import (
	"context"
	"io"
	"os"
)

// The methods below act on the Client's current sandbox (the one launched
// last, or chosen with Use). Without one they fail with ErrNoSandbox.

func (c *Client) cur() *VM {
	if c == nil {
		return nil
	}
	return c.Current()
}

// Exec runs a shell command line in the current sandbox; see VM.Exec.
func (c *Client) Exec(cmd string) (*ExecResult, error) { return c.cur().Exec(cmd) }

// ExecContext runs a shell command line; see VM.ExecContext.
func (c *Client) ExecContext(ctx context.Context, cmd string) (*ExecResult, error) {
	return c.cur().ExecContext(ctx, cmd)
}

// ExecArgv runs argv without a shell; see VM.ExecArgv.
func (c *Client) ExecArgv(argv []string) (*ExecResult, error) { return c.cur().ExecArgv(argv) }

// ExecArgvContext runs argv without a shell; see VM.ExecArgvContext.
func (c *Client) ExecArgvContext(ctx context.Context, argv []string) (*ExecResult, error) {
	return c.cur().ExecArgvContext(ctx, argv)
}

// ExecStream runs a command, streaming its output; see VM.ExecStream.
func (c *Client) ExecStream(cmd string, stdout, stderr io.Writer) (*ExecResult, error) {
	return c.cur().ExecStream(cmd, stdout, stderr)
}

// ExecStreamContext runs a command, streaming its output; see VM.ExecStreamContext.
func (c *Client) ExecStreamContext(ctx context.Context, cmd string, stdout, stderr io.Writer) (*ExecResult, error) {
	return c.cur().ExecStreamContext(ctx, cmd, stdout, stderr)
}

// ExecPipe runs a command with stdin; see VM.ExecPipe.
func (c *Client) ExecPipe(cmd string, stdin io.Reader, stdout, stderr io.Writer) (*ExecResult, error) {
	return c.cur().ExecPipe(cmd, stdin, stdout, stderr)
}

// ExecPipeContext runs a command with stdin; see VM.ExecPipeContext.
func (c *Client) ExecPipeContext(ctx context.Context, cmd string, stdin io.Reader, stdout, stderr io.Writer) (*ExecResult, error) {
	return c.cur().ExecPipeContext(ctx, cmd, stdin, stdout, stderr)
}

// Start starts a command; see VM.Start.
func (c *Client) Start(ctx context.Context, cmd *Cmd) (*Process, error) {
	return c.cur().Start(ctx, cmd)
}

// Run runs a command; see VM.Run.
func (c *Client) Run(ctx context.Context, cmd *Cmd) (*ExecResult, error) {
	return c.cur().Run(ctx, cmd)
}

// WriteFile writes a file; see VM.WriteFile.
func (c *Client) WriteFile(path string, content []byte) error {
	return c.cur().WriteFile(path, content)
}

// WriteFileContext writes a file; see VM.WriteFileContext.
func (c *Client) WriteFileContext(ctx context.Context, path string, content []byte, mode os.FileMode) error {
	return c.cur().WriteFileContext(ctx, path, content, mode)
}

// WriteFileFrom streams a file in; see VM.WriteFileFrom.
func (c *Client) WriteFileFrom(ctx context.Context, path string, r io.Reader, mode os.FileMode) (int64, error) {
	return c.cur().WriteFileFrom(ctx, path, r, mode)
}

// ReadFile reads a file; see VM.ReadFile.
func (c *Client) ReadFile(path string) ([]byte, error) { return c.cur().ReadFile(path) }

// ReadFileContext reads a file; see VM.ReadFileContext.
func (c *Client) ReadFileContext(ctx context.Context, path string) ([]byte, error) {
	return c.cur().ReadFileContext(ctx, path)
}

// ReadFileTo streams a file out; see VM.ReadFileTo.
func (c *Client) ReadFileTo(ctx context.Context, path string, w io.Writer) (int64, error) {
	return c.cur().ReadFileTo(ctx, path, w)
}

// ListFiles lists a directory; see VM.ListFiles.
func (c *Client) ListFiles(path string) ([]FileInfo, error) { return c.cur().ListFiles(path) }

// ListFilesContext lists a directory; see VM.ListFilesContext.
func (c *Client) ListFilesContext(ctx context.Context, path string) ([]FileInfo, error) {
	return c.cur().ListFilesContext(ctx, path)
}
