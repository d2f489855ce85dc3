// Command example shows the Go SDK offline: it boots a sandbox from a
// local image, runs commands (buffered, streaming, with stdin), moves
// files, and cancels a command with a context.
//
//	make build && export PATH=$PWD/bin:$PATH
//	scripts/mkimage-busybox.sh > /tmp/busybox.tar && matchlock image import busybox:latest /tmp/busybox.tar
//	go run ./examples/go                        # MATCHLOCK_IMAGE=alpine:latest to use another image
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"matchlock.dev/matchlock/sdk"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "example:", err)
		os.Exit(1)
	}
}

func run() error {
	image := os.Getenv("MATCHLOCK_IMAGE")
	if image == "" {
		image = "busybox:latest"
	}
	client, err := sdk.NewClient(sdk.DefaultConfig())
	if err != nil {
		return err
	}
	defer client.Close()

	// The secret never enters the VM: the guest sees a placeholder, which
	// the host swaps for the real value on HTTPS requests to the host.
	sandbox := sdk.New(image).
		WithEnv("GREETING", "hello from the sandbox").
		AllowHost("api.anthropic.com").
		AddSecret("ANTHROPIC_API_KEY", "sk-ant-example-not-a-real-key", "api.anthropic.com")
	t0 := time.Now()
	id, err := client.Launch(sandbox)
	if err != nil {
		return err
	}
	fmt.Printf("launched %s in %v\n", id, time.Since(t0).Round(time.Millisecond))

	// Buffered: a string runs with /bin/sh -c; a failing command is a
	// result with an exit code, not an error.
	res, err := client.Exec("echo $GREETING; uname -sr")
	if err != nil {
		return err
	}
	fmt.Print(res.Stdout)
	res, _ = client.Exec("echo \"secret as the guest sees it: $ANTHROPIC_API_KEY\"")
	fmt.Print(res.Stdout)
	res, _ = client.ExecArgv([]string{"sh", "-c", "exit 3"})
	fmt.Println("exit code:", res.ExitCode)

	// Streaming: output arrives as it is written.
	if _, err := client.ExecStream("for i in 1 2 3; do echo tick $i; sleep 0.2; done; echo done >&2", os.Stdout, os.Stderr); err != nil {
		return err
	}

	// Stdin.
	var upper strings.Builder
	if _, err := client.ExecPipe("tr a-z A-Z", strings.NewReader("piped through the guest\n"), &upper, nil); err != nil {
		return err
	}
	fmt.Print(upper.String())

	// Files, any size: they move in chunks.
	if err := client.WriteFile("/tmp/notes.txt", []byte("written from the host\n")); err != nil {
		return err
	}
	b, err := client.ReadFile("/tmp/notes.txt")
	if err != nil {
		return err
	}
	fmt.Printf("read back: %q\n", b)
	files, err := client.ListFiles("/tmp")
	if err != nil {
		return err
	}
	for _, f := range files {
		fmt.Printf("  %s %d bytes %v\n", f.Name, f.Size, f.Mode)
	}
	if _, err := client.ReadFile("/no/such/file"); errors.Is(err, sdk.ErrNotFound) {
		fmt.Println("missing file:", err)
	}

	// A context bounds a command: when it expires the guest process is killed.
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	if _, err := client.ExecContext(ctx, "sleep 60"); errors.Is(err, context.DeadlineExceeded) {
		fmt.Println("sleep 60 stopped after 500ms")
	}
	return nil
}
