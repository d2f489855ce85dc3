package sdk_test

import (
	"context"
	"fmt"
	"os"
	"time"

	"matchlock.dev/matchlock/sdk"
)

// The product documentation's example, as written: it compiles (and, with
// an alpine:latest image and network, runs). Errors are ignored for
// brevity; a failed NewClient or Launch makes every later call fail
// cleanly (results are never nil).
func Example() {
	curlCmd := "curl -s https://api.anthropic.com/v1/models -H \"x-api-key: $ANTHROPIC_API_KEY\""

	client, _ := sdk.NewClient(sdk.DefaultConfig())
	defer client.Close()
	sandbox := sdk.New("alpine:latest").
		AllowHost("dl-cdn.alpinelinux.org", "api.anthropic.com").
		AddSecret("ANTHROPIC_API_KEY", os.Getenv("ANTHROPIC_API_KEY"), "api.anthropic.com")
	client.Launch(sandbox)
	client.Exec("apk add --no-cache curl")
	result, _ := client.Exec("echo $ANTHROPIC_API_KEY") // prints "SANDBOX_SECRET_a1b2c3d4..."
	fmt.Print(result.Stdout)
	client.ExecStream(curlCmd, os.Stdout, os.Stderr)
}

// Several sandboxes, contexts and files.
func ExampleClient_LaunchVM() {
	client, err := sdk.NewClient(sdk.DefaultConfig())
	if err != nil {
		fmt.Println(err)
		return
	}
	defer client.Close()
	ctx := context.Background()
	vm, err := client.LaunchVM(ctx, sdk.New("busybox:latest").WithCPUs(2).WithMemory(256).WithoutNetwork())
	if err != nil {
		fmt.Println(err)
		return
	}
	defer vm.Close()
	vm.WriteFile("/tmp/in.txt", []byte("hello\n"))
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	res, err := vm.ExecContext(ctx, "tr a-z A-Z < /tmp/in.txt")
	if err == nil {
		fmt.Print(res.Stdout)
	}
}
