"""fleetlm.sim: a discrete-event simulator of a serving fleet, on the engine's own scheduler.

    from fleetlm.sim import FleetConfig, WorkloadSpec, fixed_profile, generate, simulate
    result = simulate(fixed_profile(0.02), FleetConfig(replicas=4, router="least_load"),
                      generate(WorkloadSpec(rate=10, num_requests=200, input_len=256, output_len=64)))
    result.metrics["p90_ttft_ms"]

See docs/SIM.md.
"""

from __future__ import annotations

from fleetlm.sim.fleet import FleetConfig, FleetSim
from fleetlm.sim.profile import EngineLimits, Profile, ProfileError, fixed_profile, load_profile
from fleetlm.sim.results import SimResult
from fleetlm.sim.workload import Arrivals, WorkloadError, WorkloadSpec, generate, load_trace

__all__ = [
    "Arrivals", "EngineLimits", "FleetConfig", "FleetSim", "Profile", "ProfileError", "SimResult",
    "WorkloadError", "WorkloadSpec", "fixed_profile", "generate", "load_profile", "load_trace", "simulate",
]


def simulate(profile: Profile, cfg: FleetConfig, arrivals: Arrivals) -> SimResult:
    """Run the fleet on ``arrivals`` until every request is done (or the fleet overloads)."""
    return FleetSim(profile, cfg, arrivals).run()
