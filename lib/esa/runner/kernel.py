"""The kernel manager papermill uses for every notebook: jupyter_client's, minus the SIGINT at shutdown.

jupyter_client's `shutdown_kernel` interrupts the kernel before asking it to shut down: a SIGINT to the
kernel's whole process group. After a successful notebook the kernel is idle and the interrupt has
nothing to stop, but it still lands wherever it lands: in a message handler the kernel is finishing
(ipykernel then logs `[IPKernelApp] ERROR | KeyboardInterrupt caught in kernel`, so a clean run ends
with an error line) and in every helper process a notebook started. The shutdown request that follows
stops an idle kernel by itself, and jupyter_client still escalates to SIGTERM and SIGKILL when it
does not; interrupts on a cell timeout (nbclient's `interrupt_on_timeout`) are untouched.
"""

from __future__ import annotations

from jupyter_client import AsyncKernelManager


class NoInterruptOnShutdown(AsyncKernelManager):
    """AsyncKernelManager whose graceful shutdown sends the shutdown request without a SIGINT first."""

    async def _async_interrupt_kernel(self) -> None:
        if self.shutting_down:  # set by _async_shutdown_kernel just before it interrupts
            return
        await super()._async_interrupt_kernel()
