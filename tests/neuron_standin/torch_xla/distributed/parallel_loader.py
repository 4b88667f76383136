"""Stand-in for ``torch_xla.distributed.parallel_loader`` (tests only)."""


class MpDeviceLoader:
    def __init__(self, loader, device, **kwargs):
        self.loader, self.device = loader, device

    def __iter__(self):
        for batch in self.loader:
            yield batch.to(self.device)

    def __len__(self):
        return len(self.loader)
