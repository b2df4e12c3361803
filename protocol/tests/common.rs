// Shared sample messages for the golden and round-trip tests.
#![allow(dead_code)]

use protocol::*;

pub fn shape() -> HeadShape {
    HeadShape {
        input: 3,
        hidden: vec![2],
        classes: 2,
    }
}

pub fn params(encoding: Encoding) -> EncodedParams {
    // 3·2 + 2 + 2·2 + 2 = 14 values.
    let values: Vec<f32> = (0..14).map(|i| (i as f32 - 6.5) * 0.125).collect();
    let spec = shape().to_spec().unwrap();
    EncodedParams::encode(&values, &RowLayout::of_head(&spec), encoding).unwrap()
}

/// The sample round task carrying `global` (a change from `base`, if any).
fn round_task(global: EncodedParams, base: Option<HeadRef>) -> RoundTask {
    RoundTask {
        run_id: 42,
        round: 3,
        shape: shape(),
        global,
        base,
        targets: vec![
            WireScope {
                mean: 0.0,
                std: 0.5,
            },
            WireScope {
                mean: -0.25,
                std: 1.0,
            },
        ],
        train: TrainSpec {
            epochs: 5,
            batch_size: 64,
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 1e-5,
            seed: 7,
            prox_mu: None,
            wsa: Some(WsaSpec {
                lambda: 10.0,
                include_biases: false,
                eps: 1e-8,
                tensor_lambdas: vec![10.0, 0.0],
            }),
        },
        encoding: Encoding::Int8RowScaled,
        deadline_ms: 30_000,
    }
}

pub fn samples() -> Vec<(&'static str, Message)> {
    vec![
        (
            "hello",
            Message::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                client_id: "c7".into(),
                auth: Auth::Token(vec![1, 2, 3, 4]),
                capabilities: Capabilities {
                    f16: true,
                    int8: true,
                },
                n_samples: 600,
                held: Some(HeadRef {
                    round: 2,
                    digest: [9; 32],
                }),
            }),
        ),
        (
            "welcome",
            Message::Welcome(Welcome {
                run_id: 42,
                round: 3,
                classes: vec!["cat".into(), "dog".into()],
                eval_fraction: 0.125,
                attempt: 2,
            }),
        ),
        (
            "round-task",
            Message::RoundTask(round_task(params(Encoding::F32), None)),
        ),
        (
            "round-task-delta",
            Message::RoundTask(round_task(
                params(Encoding::Int8RowScaled),
                Some(HeadRef {
                    round: 2,
                    digest: [9; 32],
                }),
            )),
        ),
        (
            "update-int8",
            Message::Update(
                Update {
                    run_id: 42,
                    round: 3,
                    client_id: "c7".into(),
                    n_samples: 600,
                    params: params(Encoding::Int8RowScaled),
                    scopes: vec![
                        WireScope {
                            mean: 0.125,
                            std: 0.5,
                        },
                        WireScope {
                            mean: -0.25,
                            std: 0.75,
                        },
                    ],
                    metrics: UpdateMetrics {
                        loss: 0.5,
                        accuracy: 0.75,
                        kl: 0.01,
                        steps: 50,
                        train_ms: 120,
                        held_out: Some(HeldOutEval {
                            samples: 60,
                            loss: 0.625,
                            accuracy: 0.8125,
                        }),
                    },
                    digest: [0; 32],
                }
                .seal(),
            ),
        ),
        (
            "update-f16",
            Message::Update(
                Update {
                    run_id: 42,
                    round: 3,
                    client_id: "c7".into(),
                    n_samples: 600,
                    params: params(Encoding::F16),
                    scopes: vec![],
                    metrics: UpdateMetrics::default(),
                    digest: [0; 32],
                }
                .seal(),
            ),
        ),
        (
            "verdict-accepted",
            Message::Verdict(Verdict {
                run_id: 42,
                subject: Subject::Update { round: 3 },
                outcome: Outcome::Accepted,
            }),
        ),
        (
            "verdict-rejected",
            Message::Verdict(Verdict {
                run_id: 42,
                subject: Subject::Update { round: 3 },
                outcome: Outcome::Rejected(RejectReason::StaleRound { got: 2, current: 3 }),
            }),
        ),
        (
            "goodbye",
            Message::Goodbye(Goodbye {
                reason: GoodbyeReason::RunFinished,
            }),
        ),
        (
            "final-model",
            Message::FinalModel(FinalModel {
                run_id: 42,
                rounds: 20,
                strategy: "wsa:10:mean-std".into(),
                shape: shape(),
                params: params(Encoding::F32),
                classes: vec!["cat".into(), "dog".into()],
                backbone_sha256: vec!["ab".repeat(32)],
                side: 96,
                preprocessing: "rgb-bilinear-imagenet-v1".into(),
            }),
        ),
        (
            "secagg-setup",
            Message::SecAgg(SecAgg::Setup(SecAggSetup {
                run_id: 42,
                round: 3,
                index: 2,
                participants: 10,
                neighbours: 9,
                threshold: 5,
                graph_seed: [7; 32],
                vector_len: 14,
                clip: 4.0,
                local_noise: Some(LocalNoise {
                    clip: 1.0,
                    std: 0.25,
                }),
            })),
        ),
        (
            "secagg-advertise",
            Message::SecAgg(SecAgg::Advertise(SecAggAdvertise {
                run_id: 42,
                round: 3,
                encryption_key: [1; 32],
                masking_key: [2; 32],
                self_mask_commitment: [3; 32],
            })),
        ),
        (
            "secagg-roster",
            Message::SecAgg(SecAgg::Roster(SecAggRoster {
                run_id: 42,
                round: 3,
                peers: vec![SecAggPeer {
                    index: 4,
                    encryption_key: [5; 32],
                    masking_key: [6; 32],
                }],
            })),
        ),
        (
            "secagg-shares",
            Message::SecAgg(SecAgg::Shares(SecAggShares {
                run_id: 42,
                round: 3,
                sealed: vec![SealedShares {
                    peer: 4,
                    ciphertext: vec![9; 8],
                }],
            })),
        ),
        (
            "secagg-inbox",
            Message::SecAgg(SecAgg::Inbox(SecAggInbox {
                run_id: 42,
                round: 3,
                sealed: vec![SealedShares {
                    peer: 4,
                    ciphertext: vec![8; 8],
                }],
            })),
        ),
        (
            "secagg-masked",
            Message::SecAgg(SecAgg::Masked(SecAggMasked {
                run_id: 42,
                round: 3,
                masked: vec![0xff, 0, 0, 0x80, 1, 2, 3, 4],
            })),
        ),
        (
            "secagg-unmask",
            Message::SecAgg(SecAgg::Unmask(SecAggUnmask {
                run_id: 42,
                round: 3,
                survivors: vec![1, 4],
                dropped: vec![300],
            })),
        ),
        (
            "secagg-reveal",
            Message::SecAgg(SecAgg::Reveal(SecAggReveal {
                run_id: 42,
                round: 3,
                self_mask_shares: vec![RevealedShare {
                    owner: 1,
                    share: vec![3, 1, 2],
                }],
                key_shares: vec![RevealedShare {
                    owner: 300,
                    share: vec![3, 4, 5],
                }],
            })),
        ),
    ]
}
