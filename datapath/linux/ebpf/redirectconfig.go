package ebpf

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
)

// RedirectConfig is the provider context of a built-in connect redirect
// filter: where the kernel sends the connection. It is encoded as JSON,
//
//	{"proxy":"127.0.0.1:8080","target_pid":1234,"context":"<base64>"}
//
// proxy is required (IPv4 or IPv6 with a nonzero port, and a local
// address: loopback, or one of the host's interfaces when Compile runs —
// a redirect off the host cannot work, and Compile refuses it); target_pid is the
// process allowed to query the redirect context (WFP's local redirect target
// PID; 0 for any); context is up to MaxContextLen opaque bytes handed to the
// proxy with the original destination (WFP's local redirect context).
type RedirectConfig struct {
	Proxy     netip.AddrPort `json:"proxy"`
	TargetPID uint32         `json:"target_pid,omitempty"`
	Context   []byte         `json:"context,omitempty"`
}

// Marshal encodes the configuration as provider context data.
func (c RedirectConfig) Marshal() ([]byte, error) {
	if err := c.validate(); err != nil {
		return nil, err
	}
	return json.Marshal(c)
}

// ParseRedirectConfig decodes and checks provider context data. Every error
// wraps ErrInvalidRedirect.
func ParseRedirectConfig(b []byte) (RedirectConfig, error) {
	var c RedirectConfig
	if err := decodeStrict(b, &c); err != nil {
		return RedirectConfig{}, err
	}
	if err := c.validate(); err != nil {
		return RedirectConfig{}, err
	}
	return c, nil
}

func (c RedirectConfig) validate() error {
	a := c.Proxy.Addr()
	switch {
	case !a.IsValid() || a.IsUnspecified():
		return fmt.Errorf("%w: the proxy address is missing", ErrInvalidRedirect)
	case a.Zone() != "":
		return fmt.Errorf("%w: proxy %s: zones are not supported", ErrInvalidRedirect, c.Proxy)
	case c.Proxy.Port() == 0:
		return fmt.Errorf("%w: proxy %s has no port", ErrInvalidRedirect, c.Proxy)
	case len(c.Context) > MaxContextLen:
		return fmt.Errorf("%w: context of %d bytes, at most %d", ErrInvalidRedirect, len(c.Context), MaxContextLen)
	}
	return nil
}

// BindRedirectConfig is the provider context of a built-in bind redirect
// filter, in JSON: {"local":"127.0.0.1:9090"}. An unspecified address
// (0.0.0.0 or ::) keeps the socket's address and moves only the port; port
// 0 keeps the port.
type BindRedirectConfig struct {
	Local netip.AddrPort `json:"local"`
}

// Marshal encodes the configuration as provider context data.
func (c BindRedirectConfig) Marshal() ([]byte, error) {
	if err := c.validate(); err != nil {
		return nil, err
	}
	return json.Marshal(c)
}

// ParseBindRedirectConfig decodes and checks provider context data. Every
// error wraps ErrInvalidRedirect.
func ParseBindRedirectConfig(b []byte) (BindRedirectConfig, error) {
	var c BindRedirectConfig
	if err := decodeStrict(b, &c); err != nil {
		return BindRedirectConfig{}, err
	}
	if err := c.validate(); err != nil {
		return BindRedirectConfig{}, err
	}
	return c, nil
}

func (c BindRedirectConfig) validate() error {
	a := c.Local.Addr()
	switch {
	case !a.IsValid():
		return fmt.Errorf("%w: the local address is missing", ErrInvalidRedirect)
	case a.Zone() != "":
		return fmt.Errorf("%w: %s: zones are not supported", ErrInvalidRedirect, c.Local)
	case a.IsUnspecified() && c.Local.Port() == 0:
		return fmt.Errorf("%w: %s changes nothing", ErrInvalidRedirect, c.Local)
	}
	return nil
}

// decodeStrict decodes one JSON object with no unknown fields and nothing after it.
func decodeStrict(b []byte, v any) error {
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	if err := d.Decode(v); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalidRedirect, err)
	}
	if d.More() {
		return fmt.Errorf("%w: trailing data after the JSON object", ErrInvalidRedirect)
	}
	return nil
}
