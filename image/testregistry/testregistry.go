// Package testregistry runs OCI registries for tests: Debian's real
// docker-registry (distribution) binary on a loopback port, or, for tests
// that only need some registry, go-containerregistry's in-process one.
package testregistry

import (
	"bytes"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
)

// Binary is the real registry's executable (Debian package docker-registry).
const Binary = "docker-registry"

// Registry is a running registry.
type Registry struct {
	// Host is host:port, e.g. "127.0.0.1:40123"; image references are
	// Host + "/repo:tag".
	Host string
	// Dir is the storage root of a real registry ("" in-process).
	Dir string
	// Log holds what a real registry wrote to stderr.
	Log *bytes.Buffer
}

// Start runs docker-registry on a free loopback port with storage in a temp
// dir, stopped when the test ends. It fails the test (it does not skip)
// when the binary is missing or does not come up: tests that use it are
// about the real registry.
func Start(t testing.TB) *Registry {
	t.Helper()
	bin, err := exec.LookPath(Binary)
	if err != nil {
		t.Fatalf("testregistry: %s not found (install it: apt-get install -y docker-registry): %v", Binary, err)
	}
	dir := t.TempDir()
	port, err := freePort()
	if err != nil {
		t.Fatalf("testregistry: find a free port: %v", err)
	}
	r := &Registry{Host: fmt.Sprintf("127.0.0.1:%d", port), Dir: filepath.Join(dir, "storage"), Log: &bytes.Buffer{}}
	cfg := fmt.Sprintf(`version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: %s
`, r.Dir, r.Host)
	cfgPath := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "serve", cfgPath)
	cmd.Stdout, cmd.Stderr = r.Log, r.Log
	if err := cmd.Start(); err != nil {
		t.Fatalf("testregistry: start %s: %v", bin, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
	})
	deadline := time.Now().Add(15 * time.Second)
	for {
		resp, err := http.Get("http://" + r.Host + "/v2/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return r
			}
		}
		select {
		case err := <-exited:
			t.Fatalf("testregistry: %s exited: %v\n%s", bin, err, r.Log)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("testregistry: %s did not answer on %s within 15s\n%s", bin, r.Host, r.Log)
		}
	}
}

// StartInProcess runs go-containerregistry's in-memory registry on a
// loopback port. For tests that need a registry but not the real one.
func StartInProcess(t testing.TB) *Registry {
	t.Helper()
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	return &Registry{Host: strings.TrimPrefix(srv.URL, "http://")}
}

// BlobPath is where a real registry keeps the bytes of blob digest
// ("sha256:<hex>"): tests tamper with it to serve corrupt content.
func (r *Registry) BlobPath(digest string) string {
	hex := strings.TrimPrefix(digest, "sha256:")
	return filepath.Join(r.Dir, "docker", "registry", "v2", "blobs", "sha256", hex[:2], hex, "data")
}

// ClosedAddr returns a loopback host:port that nothing listens on.
func ClosedAddr(t testing.TB) string {
	t.Helper()
	port, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("127.0.0.1:%d", port)
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
