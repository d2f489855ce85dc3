# matchlock build and test entry points. See README.md.
GO      ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X matchlock.dev/matchlock/internal/version.Version=$(VERSION)

.PHONY: build kernel test test-unit fuzz bench clean

## build: the CLI and the static guest agent, side by side in bin/
build:
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/matchlock ./cmd/matchlock
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '-s -w' -o bin/matchlock-guest ./cmd/matchlock-guest

## kernel: the guest kernel, cached by content hash under ~/.cache/matchlock/kernel
kernel:
	./kernel/build.sh

## test: every test, real VMs included (needs `make kernel` and the apt packages of scripts/setup.sh)
test: build kernel
	./scripts/test.sh

## test-unit: fast tests only (no VMs)
test-unit:
	$(GO) test -short ./...

bench: build kernel
	./bench/run.sh

clean:
	rm -rf bin
