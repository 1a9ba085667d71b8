"""``megarlhf demo``: the whole RLHF pipeline on a tiny model, on CPU (see megarlhf/demo)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the CPU demo: SFT -> reward model -> GRPO on a tiny "
                                    "Megatron model (a few minutes on 2 cores)")
    p.add_argument("--agent", action="store_true",
                   help="the agent demo instead: SFT on calculator conversations, then GRPO "
                        "with the calculator environment (multi-turn, tool calls)")
    p.add_argument("--output-dir", default=None,
                   help="where everything is written (default outputs/demo, or "
                        "outputs/demo-agent with --agent)")
    p.add_argument("--reward", choices=["verifier", "rm", "mix"], default="verifier",
                   help="GRPO's reward: the answer verifier, the trained ORM, or both")
    p.add_argument("--sft-steps", type=int, default=None, help="override the SFT length")
    p.add_argument("--rl-steps", type=int, default=None, help="override the GRPO length")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier demo in --output-dir (the demo's own files only)")
    p.set_defaults(func=run)


def run(args) -> int:
    from megarlhf.commands import UsageError
    from megarlhf.demo import run_demo

    for flag, steps in (("--sft-steps", args.sft_steps), ("--rl-steps", args.rl_steps)):
        if steps is not None and steps < 1:
            raise UsageError(f"{flag} {steps}: give a number of steps >= 1 (or leave it out for "
                             "the demo's default)")
    if args.agent:
        from megarlhf.demo.agent import run_agent_demo

        if args.reward != "verifier":
            raise UsageError(f"--reward {args.reward}: the agent demo is rewarded by its "
                             "environment; drop --reward")
        run_agent_demo(args.output_dir or "outputs/demo-agent", sft_steps=args.sft_steps,
                       rl_steps=args.rl_steps, progress=not args.no_progress,
                       overwrite=args.overwrite)
        return 0
    run_demo(args.output_dir or "outputs/demo", sft_steps=args.sft_steps,
             rl_steps=args.rl_steps, reward=args.reward, progress=not args.no_progress,
             overwrite=args.overwrite)
    return 0
