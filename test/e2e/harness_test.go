// Package e2e drives the real matchlock binary against real VMs under QEMU.
// TestMain builds the CLI and the guest agent, points matchlock at private
// cache and state directories, and imports the test images.
package e2e

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"matchlock.dev/matchlock/kernel"
)

var (
	bin      string // the matchlock binary under test
	repoRoot string
	stateDir string
	cacheDir string
)

func TestMain(m *testing.M) {
	flag.Parse()
	if testing.Short() {
		os.Exit(0) // the VM tier needs `make kernel`; -short is the unit tier
	}
	code, err := setup(m)
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e setup:", err)
		os.Exit(1)
	}
	os.Exit(code)
}

func setup(m *testing.M) (int, error) {
	_, file, _, _ := runtime.Caller(0)
	repoRoot = filepath.Join(filepath.Dir(file), "..", "..")
	tmp, err := os.MkdirTemp("", "matchlock-e2e-")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(tmp)

	// Resolve the kernel before moving the cache: the kernel is the one
	// artefact the tests share with the developer's cache.
	k, err := kernel.Find("")
	if err != nil {
		return 0, fmt.Errorf("%v (run `make kernel` first)", err)
	}
	os.Setenv(kernel.Env, k)
	// Keep the KVM verdict cache of the real cache so that the probe runs
	// once per machine, not once per test run.
	cacheDir = filepath.Join(tmp, "cache")
	stateDir = filepath.Join(tmp, "state")
	os.Setenv("MATCHLOCK_CACHE", cacheDir)
	os.Setenv("MATCHLOCK_HOME", stateDir)

	binDir := filepath.Join(tmp, "bin")
	bin = filepath.Join(binDir, "matchlock")
	if out, err := goBuild(bin, "./cmd/matchlock", false); err != nil {
		return 0, fmt.Errorf("build matchlock: %v\n%s", err, out)
	}
	if out, err := goBuild(filepath.Join(binDir, "matchlock-guest"), "./cmd/matchlock-guest", true); err != nil {
		return 0, fmt.Errorf("build guest: %v\n%s", err, out)
	}
	if err := importImages(tmp); err != nil {
		return 0, err
	}
	return m.Run(), nil
}

func goBuild(out, pkg string, static bool) ([]byte, error) {
	cmd := exec.Command("go", "build", "-o", out, pkg)
	cmd.Dir = repoRoot
	cmd.Env = os.Environ()
	if static {
		cmd.Env = append(cmd.Env, "CGO_ENABLED=0")
	}
	return cmd.CombinedOutput()
}

// importImages imports busybox:latest (plain rootfs tar from
// scripts/mkimage-busybox.sh) and the configured test image.
func importImages(tmp string) error {
	tarPath := filepath.Join(tmp, "busybox.tar")
	mk := exec.Command(filepath.Join(repoRoot, "scripts", "mkimage-busybox.sh"))
	f, err := os.Create(tarPath)
	if err != nil {
		return err
	}
	mk.Stdout = f
	mk.Stderr = os.Stderr
	err = mk.Run()
	f.Close()
	if err != nil {
		return fmt.Errorf("mkimage-busybox: %w", err)
	}
	if out, err := exec.Command(bin, "image", "import", "busybox:latest", tarPath).CombinedOutput(); err != nil {
		return fmt.Errorf("import busybox: %v: %s", err, out)
	}
	cfgTar := filepath.Join(tmp, "configured.tar")
	if err := writeConfiguredImage(tarPath, cfgTar); err != nil {
		return fmt.Errorf("configured image: %w", err)
	}
	if out, err := exec.Command(bin, "image", "import", "configured:1", cfgTar).CombinedOutput(); err != nil {
		return fmt.Errorf("import configured: %v: %s", err, out)
	}
	return nil
}

type result struct {
	stdout, stderr string
	code           int
}

// ml runs matchlock with args and optional stdin, bounded by a deadline.
func ml(t *testing.T, stdin io.Reader, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr, cmd.Stdin = &out, &errb, stdin
	err := cmd.Run()
	code := 0
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			t.Fatalf("matchlock %s: %v", strings.Join(args, " "), err)
		}
		code = ee.ExitCode()
	}
	return result{out.String(), errb.String(), code}
}

// mustRun runs and requires exit 0.
func mustRun(t *testing.T, args ...string) result {
	t.Helper()
	r := ml(t, nil, args...)
	if r.code != 0 {
		t.Fatalf("matchlock %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r
}

// sandboxDirs lists the sandbox directories in the state dir.
func sandboxDirs(t *testing.T) map[string]bool {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(stateDir, "sandboxes"))
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, e := range ents {
		names[e.Name()] = true
	}
	return names
}

// newSandboxDirs returns the sandbox directories not in before.
func newSandboxDirs(t *testing.T, before map[string]bool) []string {
	t.Helper()
	var out []string
	for n := range sandboxDirs(t) {
		if !before[n] {
			out = append(out, n)
		}
	}
	return out
}

var netprobePath string

// netprobe builds the static guest test client once.
func netprobe(t *testing.T) string {
	t.Helper()
	if netprobePath == "" {
		p := filepath.Join(os.TempDir(), fmt.Sprintf("matchlock-netprobe-%d", os.Getpid()))
		if out, err := goBuild(p, "./test/e2e/netprobe", true); err != nil {
			t.Fatalf("build netprobe: %v\n%s", err, out)
		}
		netprobePath = p
	}
	return netprobePath
}
