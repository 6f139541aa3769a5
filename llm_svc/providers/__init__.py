"""Provider adapters: each turns a `ProviderRequest` into a stream of `ProviderEvent`s."""
